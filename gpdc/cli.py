"""The ``gpdc`` command line. User errors print one paragraph and exit with code 2.

No traceback reaches a user: bad input (``GpdcError``) prints its message; an interrupt prints
"interrupted" (exit 130; SIGTERM during ``compile``: "terminated", 143); running out of memory or disk
space, or a folder that cannot be written, prints what to change (exit 2); any other exception is a
gpdc bug and prints one "internal error in gpdc" paragraph (exit 2, never 1: exit 1 means a numerical
check failed). ``GPDC_DEBUG=1`` prints the traceback as well.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import traceback

import click
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import GpdcError
from .outdir import Terminated, write_error_reason

console = Console(stderr=True)

_NOT_WRITABLE = {errno.EACCES, errno.EROFS, errno.EPERM}


def _debug() -> bool:
    return os.environ.get("GPDC_DEBUG", "").strip() not in ("", "0")


def _one_line(e: BaseException, limit: int = 600) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + " …"


def _fail(message: str, code: int, prefix: str = "error:") -> None:
    if _debug():
        traceback.print_exc()
    console.print(f"[bold red]{prefix}[/] {escape(message)}" if prefix else escape(message), highlight=False,
                  soft_wrap=True)
    sys.exit(code)


def _out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click prints usage errors itself (exit 2)
        except GpdcError as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted.", 130, prefix="")
        except Terminated as e:
            _fail("terminated.", e.code, prefix="")
        except BaseException as e:  # noqa: BLE001 -- no traceback reaches a user
            if isinstance(e, (SystemExit, GeneratorExit)):
                raise
            if _out_of_memory(e):
                _fail(f"out of memory ({type(e).__name__}: {_one_line(e, 300) or 'no detail'}). Lower expand.ratio "
                      "(and the ratios in expand.layers) or the spec's input_shape (batch size, image size), or run "
                      "on a machine with more memory.", 2)
            reason = write_error_reason(e)
            if reason is not None:
                name = getattr(e, "filename", None) or "a file"
                if isinstance(e, OSError) and e.errno in _NOT_WRITABLE:
                    _fail(f"cannot use {name}: {reason}; check its permissions, or choose another --out.", 2)
                _fail(f"cannot write {name}: {reason}; free some space or choose another --out.", 2)
            _fail(f"internal error in gpdc: {type(e).__name__}: {_one_line(e) or '(no message)'}. This is a gpdc bug, "
                  "not a problem gpdc found in your input; please report it with the command and the model "
                  "(GPDC_DEBUG=1 shows the traceback).", 2)


@click.group(cls=_Group)
def main() -> None:
    """gpdc: compile a student model into an exact GPD dynamic teacher and back."""


@main.command("spec")
@click.option("--schema", is_flag=True, help="Print the JSON schema of gpdc specs.")
@click.argument("path", required=False)
def spec_cmd(schema: bool, path: str | None) -> None:
    """Validate a spec file (or print the schema with --schema)."""
    from .spec import Spec, load_spec

    if schema:
        click.echo(json.dumps(Spec.model_json_schema(), indent=2))
        return
    if path is None:
        raise GpdcError("give a spec file to validate (gpdc spec specs/r18.yaml) or --schema.")
    click.echo(load_spec(path).model_dump_json(indent=2))


_PROBED = ("probed: every other function and method, and modules without parameters or buffers, run on probe "
           "tensors (gpdc/rules/probe.py) and are followed when they act on each channel alike, refused otherwise")


@main.command("rules")
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
def rules_cmd(as_json: bool) -> None:
    """List what gpdc supports: the channel rules, the leaf registries and the torchvision/timm integrations."""
    from .rules.integrations import INTEGRATIONS
    from .rules.registry import catalogue

    listing = catalogue() | {"integrations": [e.as_dict() for e in INTEGRATIONS], "probed": _PROBED}
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    out = Console(highlight=False, soft_wrap=True)
    for key in ("module_rules", "function_rules", "method_rules"):
        out.print(f"[bold]{key.replace('_', ' ')}[/] (by rule)")
        for rule, targets in listing[key].items():
            out.print(f"  {rule}: {', '.join(targets)}", markup=False)
    for key in ("leaf_modules", "leaf_functions"):
        out.print(f"[bold]{key.replace('_', ' ')}[/]: {', '.join(listing[key]) or 'none'}")
    out.print("[bold]integrations[/] (gpdc/rules/integrations.py)")
    for e in listing["integrations"]:
        rule = f" {e['rule']}" if e["rule"] else ""
        skipped = "" if e["installed"] else f" (skipped: {e['library']} is not installed)"
        out.print(f"  {e['target']}: {e['kind']}{rule}{skipped}; {e['reason']}", markup=False)
    out.print(listing["probed"], markup=False)


@main.command("expand")
@click.argument("model")
@click.option("--spec", "spec_path", required=True, help="YAML spec (see specs/).")
@click.option("--entry", default="build_model", show_default=True, help="Function in model.py that builds the model.")
@click.option("--explain", is_flag=True, help="Print what the IR pass did to each layer.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def expand_cmd(model: str, spec_path: str, entry: str, explain: bool, as_json: bool) -> None:
    """Expand MODEL into its dynamic teacher and check that teacher and student are exact."""
    from .exactness import check_expansion, check_shape
    from .expansion import expand
    from .models import load_model
    from .spec import load_spec

    spec = load_spec(spec_path)
    net = load_model(model, entry)
    with console.status("trace → analyze → plan → expand"):
        exp = expand(net, spec)
    torch.manual_seed(0)
    shape, note = check_shape(exp)
    checks = check_expansion(exp, torch.randn(*shape))
    report = exp.report() | {"exactness": checks, "notes": [n for n in (note,) if n]}
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)
        if explain:
            for line in exp.log:
                click.echo(f"  {line}")
    if not all(c["ok"] for c in checks.values()):
        sys.exit(1)


@main.command("compile")
@click.argument("model")
@click.option("--spec", "spec_path", required=True, help="YAML spec (see specs/).")
@click.option("--out", default=None, help="Output folder (default out/<model>).")
@click.option("--entry", default="build_model", show_default=True, help="Function in model.py that builds the model.")
@click.option("--explain", is_flag=True, help="Print what each pass did to each layer and why it skipped what it skipped.")
@click.option("--no-onnx", is_flag=True, help="Skip the ONNX export and its check (for a model torch.onnx cannot export).")
def compile_cmd(model: str, spec_path: str, out: str | None, entry: str, explain: bool, no_onnx: bool) -> None:
    """Expand, branch, fold and export MODEL; check every step for exactness.

    Exit 0 when every check passes, 1 when an equivalence check fails, 2 for bad input."""
    from .compile import compile_model

    with console.status("compiling") as status:
        def on_stage(name, seconds):
            console.print(f"[green]✓[/] {name:11s} {seconds:7.2f}s")
            status.update(f"after {name}")

        report, log = compile_model(model, spec_path, out, entry, on_stage, onnx=not no_onnx)
    if explain:
        for line in log:
            click.echo(f"  {line}")
    _print_report(report)
    o = report["onnx"]
    out_console = Console()
    out_console.print(f"fold            max rel error {report['fold']['max_rel_error']:.2e} "
                      + ("[green]exact[/]" if report["fold"]["ok"] else "[red]NOT EXACT[/]"))
    if o is not None:
        out_console.print(f"onnx            max abs {o['max_abs']:.2e} (tol {o['tolerance']:.2e}), cosine {o['cosine']:.7f}, "
                          f"worst output '{o['worst_output']}' ({o['worst_setting']}) "
                          + ("[green]equal[/]" if o["ok"] else "[red]DIFFERS[/]"))
    out_console.print(f"wrote {', '.join(report['files'])} to {report['out']}")
    sys.exit(0 if report["ok"] else 1)


@main.command("check")
@click.argument("onnx_file")
@click.option("--model", "model_ref", required=True, help="path/to/model.py, torchvision:NAME or timm:NAME.")
@click.option("--weights", required=True, help="student.safetensors written by gpdc compile/train.")
@click.option("--entry", default="build_model", show_default=True)
@click.option("--atol", default=1e-4, show_default=True, callback=lambda c, p, v: _tolerance(p, v),
              help="Max abs error, relative to max(1, output scale).")
@click.option("--rtol", default=0.0, show_default=True, callback=lambda c, p, v: _tolerance(p, v),
              help="Extra tolerance proportional to the output scale.")
def check_cmd(onnx_file: str, model_ref: str, weights: str, entry: str, atol: float, rtol: float) -> None:
    """CI gate: does ONNX_FILE compute what MODEL with WEIGHTS computes? Exit 0 or 1 with the numbers.

    Exit 2 when the files are unreadable or do not belong to MODEL (other input or output shapes)."""
    from pathlib import Path

    import onnx
    from safetensors.torch import load_file

    from .export import check_onnx
    from .models import load_model, load_state_dict_strict

    for f, what in ((onnx_file, "student.onnx"), (weights, "student.safetensors")):
        if Path(f).is_dir():
            raise GpdcError(f"{f} is a folder; pass the file written by `gpdc compile` ({what} in it).")
        if not Path(f).is_file():
            raise GpdcError(f"{f} does not exist; pass the files written by `gpdc compile` (student.onnx, student.safetensors).")
    if Path(onnx_file).stat().st_size == 0:
        raise GpdcError(f"{onnx_file} is empty (0 bytes): not an ONNX model (an interrupted copy?); pass the student.onnx "
                        "written by `gpdc compile`.")
    try:
        proto = onnx.load(onnx_file)
        onnx.checker.check_model(onnx_file)
    except Exception as e:
        raise GpdcError(f"{onnx_file} is not a readable ONNX file ({type(e).__name__}: {_one_line(e, 300)}); pass "
                        "the student.onnx written by `gpdc compile`.") from None
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if not inputs or not proto.graph.output:
        raise GpdcError(f"{onnx_file} has {len(inputs)} inputs and {len(proto.graph.output)} outputs: not a model "
                        "gpdc can check; pass the student.onnx written by `gpdc compile`.")
    net = load_model(model_ref, entry)
    try:
        state = load_file(weights)
    except Exception as e:
        raise GpdcError(f"{weights} is not a readable safetensors file ({type(e).__name__}).") from None
    try:
        load_state_dict_strict(net, state)
    except RuntimeError as e:
        raise GpdcError(f"{weights} does not match {model_ref}: {_one_line(e, 3000)} Use the weights written for this "
                        "model.") from None
    torch.manual_seed(0)
    x = _onnx_fits_model(onnx_file, inputs, net, model_ref)
    eq = check_onnx(onnx_file, net, x, atol=atol, rtol=rtol)
    click.echo(json.dumps(eq.as_dict(), indent=2))
    sys.exit(0 if eq.ok else 1)


@main.command("train", context_settings={"show_default": True})
@click.argument("student")
@click.option("--spec", "spec_path", required=True, help="YAML spec with a train: section.")
@click.option("--data", default="digits", help="digits | cifar10:DIR | cifar100:DIR | imagefolder:DIR")
@click.option("--teacher", "teacher_ref", default=None, help="Static teacher: path/to/model.py, torchvision:NAME, timm:NAME.")
@click.option("--teacher-weights", default=None, help="Static teacher weights (.safetensors or a torch state_dict).")
@click.option("--student-weights", default=None, help="Start from these student weights (finetune mode).")
@click.option("--epochs", type=int, default=None, help="Override train.epochs.")
@click.option("--lr", type=float, default=None, help="Override train.lr.")
@click.option("--batch-size", type=int, default=None, help="Override train.batch_size.")
@click.option("--out", default=None, help="Output folder (default out/train_<student>).")
@click.option("--resume", is_flag=True, help="Continue from OUT/last.ckpt.")
@click.option("--save-every", type=click.IntRange(min=1), default=None,
              help="Also keep OUT/epoch_NNNN.ckpt every N epochs (last.ckpt is always written).")
@click.option("--seed", type=int, default=0)
@click.option("--entry", default="build_model", help="Function in model.py that builds the model.")
@click.option("--teacher-entry", default=None,
              help="Function in the teacher's model.py that builds it (default: --entry), so one file can hold both.")
@click.option("--no-onnx", is_flag=True, help="Skip the ONNX export of the folded student at the end.")
def train_cmd(student, spec_path, data, teacher_ref, teacher_weights, student_weights, epochs, lr, batch_size, out,
              resume, save_every, seed, entry, teacher_entry, no_onnx) -> None:
    """GPD training of STUDENT (distill with --teacher, scratch without, finetune with --student-weights)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .train.loop import train

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True) as progress:
        metrics = train(student, spec_path, data, out, teacher_ref=teacher_ref, teacher_weights=teacher_weights,
                        student_weights=student_weights, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                        resume=resume, entry=entry, teacher_entry=teacher_entry, progress=progress,
                        save_every=save_every, export=not no_onnx,
                        log=lambda line: print(line, flush=True))  # stdout, terminal or not
    if metrics:
        last = metrics[-1]
        parts = [f"{k} {100 * last[k]:.2f}%" for k in ("student_acc", "teacher_acc", "static_acc") if last.get(k) is not None]
        Console().print(f"epoch {last['epoch']}: " + ", ".join(parts))


def _tolerance(param, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise click.BadParameter(f"must be a finite number >= 0, got {value}.", param=param)
    return value


def _tensor_leaves(value) -> list:
    """The tensors of a model output, in the order the ONNX export lists them (tuples, lists, dicts in
    insertion order, namedtuples and dataclasses by field)."""
    import dataclasses

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensor_leaves(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensor_leaves(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in _tensor_leaves(getattr(value, f.name))]
    return []


def _onnx_fits_model(onnx_file: str, inputs: list, net: torch.nn.Module, model_ref: str) -> torch.Tensor:
    """The example input for ``gpdc check``, after checking that ``onnx_file`` takes what ``net`` takes and
    returns as many outputs, of the same shapes: another model's ONNX file is bad input (exit 2), not a
    numerical failure (exit 1)."""
    import onnx
    import onnxruntime as ort

    def mismatch(why: str) -> GpdcError:
        return GpdcError(f"the ONNX file does not match {model_ref}: {why}. Pass the student.onnx written for this "
                         "model (and its weights).")

    if len(inputs) != 1:
        raise mismatch(f"{onnx_file} takes {len(inputs)} inputs, the model takes one tensor")
    tensor_type = inputs[0].type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise mismatch(f"its input is {onnx.TensorProto.DataType.Name(tensor_type.elem_type)}, not a float32 tensor")
    shape = [d.dim_value if d.dim_value > 0 else 2 for d in tensor_type.shape.dim]
    x = torch.randn(*shape)
    try:
        with torch.no_grad():
            refs = _tensor_leaves(net.eval()(x))
    except Exception as e:
        raise mismatch(f"the model cannot run on its input shape {shape} ({type(e).__name__}: {_one_line(e, 300)})") from None
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(onnx_file, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise GpdcError(f"onnxruntime cannot load {onnx_file} ({_one_line(e, 300)}); pass the student.onnx written by "
                        "`gpdc compile`.") from None
    try:
        outs = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    except Exception as e:
        raise mismatch(f"onnxruntime cannot run it on an input of shape {shape} ({_one_line(e, 300)})") from None
    if len(outs) != len(refs):
        raise mismatch(f"it has {len(outs)} outputs, the model's output has {len(refs)} tensors")
    for i, (o, r, info) in enumerate(zip(outs, refs, sess.get_outputs())):
        if tuple(o.shape) != tuple(r.shape):
            raise mismatch(f"on an input of shape {shape} its output '{info.name}' has shape {list(o.shape)}, the "
                           f"model's output {'#' + str(i) + ' ' if len(refs) > 1 else ''}has {list(r.shape)}")
    return x


def _print_report(report: dict) -> None:
    out = Console()
    table = Table(title=f"coupled channel groups ({report['strategy']})")
    for col in ("group", "C", "C'", "ratio", "set by", "layers"):
        table.add_column(col)
    for g in report["groups"]:
        layers = ", ".join(g["layers"][:3]) + (f" (+{len(g['layers']) - 3})" if len(g["layers"]) > 3 else "")
        c = f"{g['C']} (per channel)" if g.get("per_channel") else str(g["C"])  # producers of different widths
        table.add_row(str(g["group"]), c, str(g["C_teacher"]), f"{g['ratio']:g}", g["rule"], layers)
    out.print(table)
    out.print(f"parameters: student {report['student_params']:,}  teacher {report['teacher_params']:,}")
    outputs = report.get("outputs", {})
    if len(outputs) > 1 or any(v == "widened" for v in outputs.values()):
        out.print("outputs: " + ", ".join(f"{k} {v}" for k, v in outputs.items()), highlight=False)
    special = report.get("specialised_to_input", [])
    if special:
        shown = "; ".join(f"{s['where']} `{s['code']}` -> {s['value']!r}" for s in special[:4])
        out.print(f"note: the graph is specialised to the spec's input_shape ({len(special)} Python value(s) computed "
                  f"from the input's shape or forward's default arguments: {shown}"
                  + (", ..." if len(special) > 4 else "") + ")", highlight=False, markup=False)
    for note in report.get("notes", []):
        out.print(f"note: {note}", highlight=False, markup=False)
    unwidened = report.get("student_width_ops", {})
    if unwidened:
        shown = "; ".join(f"'{name}': {why}" for name, why in list(unwidened.items())[:3])
        out.print(f"note: the teacher runs {len(unwidened)} op(s) at the student's width, exactly but not widened "
                  f"({shown}" + ("; ..." if len(unwidened) > 3 else "") + "); --explain lists them", highlight=False,
                  markup=False)
    for k, c in report.get("exactness", report.get("ir", {})).items():
        status = "[green]exact[/]" if c["ok"] else "[red]NOT EXACT[/]"
        out.print(f"{k:15s} max error {c['error']:.2e} (bound {c['bound']:.2e}) {status}")
