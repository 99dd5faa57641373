"""The ``gpdc`` command line. User errors print one paragraph and exit with code 2."""

from __future__ import annotations

import json
import sys

import click
import torch
from rich.console import Console
from rich.table import Table

from .errors import GpdcError

console = Console(stderr=True)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GpdcError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)


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


@main.command("expand")
@click.argument("model")
@click.option("--spec", "spec_path", required=True, help="YAML spec (see specs/).")
@click.option("--entry", default="build_model", show_default=True, help="Function in model.py that builds the model.")
@click.option("--explain", is_flag=True, help="Print what the IR pass did to each layer.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def expand_cmd(model: str, spec_path: str, entry: str, explain: bool, as_json: bool) -> None:
    """Expand MODEL into its dynamic teacher and check that teacher and student are exact."""
    from .exactness import check_expansion
    from .expansion import expand
    from .models import load_model
    from .spec import load_spec

    spec = load_spec(spec_path)
    net = load_model(model, entry)
    with console.status("trace → analyze → plan → expand"):
        exp = expand(net, spec)
    torch.manual_seed(0)
    x = torch.randn(*spec.input_shape)
    checks = check_expansion(exp, x)
    report = exp.report() | {"exactness": checks}
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
def compile_cmd(model: str, spec_path: str, out: str | None, entry: str, explain: bool) -> None:
    """Expand, branch, fold and export MODEL; check every step for exactness.

    Exit 0 when every check passes, 1 when an equivalence check fails, 2 for bad input."""
    from .compile import compile_model

    with console.status("compiling") as status:
        def on_stage(name, seconds):
            console.print(f"[green]✓[/] {name:11s} {seconds:7.2f}s")
            status.update(f"after {name}")

        report, log = compile_model(model, spec_path, out, entry, on_stage)
    if explain:
        for line in log:
            click.echo(f"  {line}")
    _print_report(report)
    o = report["onnx"]
    out_console = Console()
    out_console.print(f"fold            max rel error {report['fold']['max_rel_error']:.2e} "
                      + ("[green]exact[/]" if report["fold"]["ok"] else "[red]NOT EXACT[/]"))
    out_console.print(f"onnx            max abs {o['max_abs']:.2e} (tol {o['tolerance']:.2e}), cosine {o['cosine']:.7f}, "
                      f"worst output '{o['worst_output']}' ({o['worst_setting']}) " + ("[green]equal[/]" if o["ok"] else "[red]DIFFERS[/]"))
    out_console.print(f"wrote {', '.join(report['files'])} to {report['out']}")
    sys.exit(0 if report["ok"] else 1)


@main.command("check")
@click.argument("onnx_file")
@click.option("--model", "model_ref", required=True, help="path/to/model.py, torchvision:NAME or timm:NAME.")
@click.option("--weights", required=True, help="student.safetensors written by gpdc compile/train.")
@click.option("--entry", default="build_model", show_default=True)
@click.option("--atol", default=1e-4, show_default=True, help="Max abs error, relative to max(1, output scale).")
@click.option("--rtol", default=0.0, show_default=True, help="Extra tolerance proportional to the output scale.")
def check_cmd(onnx_file: str, model_ref: str, weights: str, entry: str, atol: float, rtol: float) -> None:
    """CI gate: does ONNX_FILE compute what MODEL with WEIGHTS computes? Exit 0 or 1 with the numbers."""
    from pathlib import Path

    import onnx
    from safetensors.torch import load_file

    from .export import check_onnx
    from .models import load_model, load_state_dict_strict

    for f in (onnx_file, weights):
        if not Path(f).is_file():
            raise GpdcError(f"{f} does not exist; pass the files written by `gpdc compile` (student.onnx, student.safetensors).")
    try:
        proto = onnx.load(onnx_file)
    except Exception as e:
        raise GpdcError(f"{onnx_file} is not a readable ONNX file ({type(e).__name__}).") from None
    net = load_model(model_ref, entry)
    try:
        state = load_file(weights)
    except Exception as e:
        raise GpdcError(f"{weights} is not a readable safetensors file ({type(e).__name__}).") from None
    try:
        load_state_dict_strict(net, state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise GpdcError(f"{weights} does not match {model_ref}: {first} Use the weights written for this model.") from None
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.dim_value > 0 else 2 for d in dims]
    torch.manual_seed(0)
    eq = check_onnx(onnx_file, net, torch.randn(*shape), atol=atol, rtol=rtol)
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
@click.option("--seed", type=int, default=0)
@click.option("--entry", default="build_model", help="Function in model.py that builds the model.")
def train_cmd(student, spec_path, data, teacher_ref, teacher_weights, student_weights, epochs, lr, batch_size, out,
              resume, seed, entry) -> None:
    """GPD training of STUDENT (distill with --teacher, scratch without, finetune with --student-weights)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .train.loop import train

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        metrics = train(student, spec_path, data, out, teacher_ref=teacher_ref, teacher_weights=teacher_weights,
                        student_weights=student_weights, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                        resume=resume, entry=entry, progress=progress)
    if metrics:
        last = metrics[-1]
        parts = [f"{k} {100 * last[k]:.2f}%" for k in ("student_acc", "teacher_acc", "static_acc") if last.get(k) is not None]
        Console().print(f"epoch {last['epoch']}: " + ", ".join(parts))


def _print_report(report: dict) -> None:
    out = Console()
    table = Table(title=f"coupled channel groups ({report['strategy']})")
    for col in ("group", "C", "C'", "ratio", "set by", "layers"):
        table.add_column(col)
    for g in report["groups"]:
        layers = ", ".join(g["layers"][:3]) + (f" (+{len(g['layers']) - 3})" if len(g["layers"]) > 3 else "")
        table.add_row(str(g["group"]), str(g["C"]), str(g["C_teacher"]), f"{g['ratio']:g}", g["rule"], layers)
    out.print(table)
    out.print(f"parameters: student {report['student_params']:,}  teacher {report['teacher_params']:,}")
    for k, c in report.get("exactness", report.get("ir", {})).items():
        status = "[green]exact[/]" if c["ok"] else "[red]NOT EXACT[/]"
        out.print(f"{k:15s} max error {c['error']:.2e} (bound {c['bound']:.2e}) {status}")
