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
    from .exactness import check, randomize_bn, reference, set_mode
    from .expansion import expand
    from .models import load_model
    from .spec import load_spec

    spec = load_spec(spec_path)
    net = load_model(model, entry)
    with console.status("trace → analyze → plan → expand"):
        exp = expand(net, spec)
    torch.manual_seed(0)
    x = torch.randn(*spec.input_shape)
    checks = {}
    for norm_train in (False, True):
        ref, own = reference(exp.original, x, norm_train)
        for name, cand in (("teacher", exp.teacher), ("student", exp.student)):
            e = check(set_mode(cand, norm_train), ref, own, x)
            checks[f"{name}/{'train' if norm_train else 'eval'}"] = {"error": e.error, "bound": e.bound, "ok": e.ok}
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
    for k, c in report["exactness"].items():
        status = "[green]exact[/]" if c["ok"] else "[red]NOT EXACT[/]"
        out.print(f"{k:15s} max error {c['error']:.2e} (bound {c['bound']:.2e}) {status}")
