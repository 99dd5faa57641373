"""Bad input never shows a traceback: one paragraph and exit 2 (exit 1 only for a failed numerical check);
a compile's outputs appear together or not at all, also when it is interrupted or the disk is full.

Each bad-input case runs the CLI in a process of its own, with its own stdout/stderr and exit status,
like ``python -m gpdc``; to keep the file fast these processes are forked from one driver that imported
gpdc once (a ``python -m gpdc`` start costs seconds of imports), before it ran any torch op.
"""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

OWN = ["report.json", "student.onnx", "student.safetensors", "teacher.safetensors"]
ROOT = Path(__file__).resolve().parents[1]

TINY = """
from torch import nn
def build_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, {classes}){extra})
"""


def run_cli(*args, cwd=ROOT, env=None, umask=None):
    return subprocess.run([sys.executable, "-m", "gpdc", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def leftovers(folder: Path) -> list[str]:
    """Temporary folders or files of gpdc beside ``folder`` or inside it."""
    beside = [e for e in os.listdir(folder.parent) if e.startswith(f".{folder.name}.gpdc-")]
    inside = [e for e in os.listdir(folder) if e.startswith(".")] if folder.is_dir() else []
    return beside + inside


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model compiled once (for the `gpdc check` cases), and every bad input file."""
    d = tmp_path_factory.mktemp("bad")
    (d / "tiny.py").write_text(TINY.format(classes=4, extra=""))
    (d / "tiny.yaml").write_text("input_shape: [2, 3, 8, 8]\n")
    r = run_cli("compile", d / "tiny.py", "--spec", d / "tiny.yaml", "--out", d / "tiny")
    assert r.returncode == 0, r.stderr
    tiny, other = {}, {}
    exec(TINY.format(classes=4, extra=""), tiny)
    exec(TINY.format(classes=7, extra=", nn.Linear(7, 3)"), other)
    from gpdc.export import export_onnx

    export_onnx(other["build_model"]().eval(), torch.randn(2, 3, 8, 8), d / "other.onnx")
    save_file(other["build_model"]().state_dict(), d / "other.safetensors")
    torch.manual_seed(123)
    save_file(tiny["build_model"]().state_dict(), d / "tiny_other_weights.safetensors")
    (d / "raises.py").write_text("def build_model():\n    raise ValueError('no such checkpoint: w.pt')\n")
    (d / "args.py").write_text("def build_model(width, depth=2):\n    return None\n")
    (d / "notmodule.py").write_text("def build_model():\n    return 'resnet'\n")
    (d / "identity.py").write_text("import torch\ndef build_model():\n    return torch.nn.Identity()\n")
    (d / "inf.yaml").write_text("input_shape: [2, 3, 8, 8]\nexpand:\n  ratio: 1e400\n")
    (d / "nan.yaml").write_text("input_shape: [2, 3, 8, 8]\nexpand:\n  ratio: .nan\n")
    (d / "layer_inf.yaml").write_text("input_shape: [2, 3, 8, 8]\nexpand:\n  layers:\n    '0': .inf\n")
    (d / "latin1.yaml").write_bytes("# Größe\ninput_shape: [2, 3, 8, 8]\n".encode("latin-1"))
    (d / "dir.yaml").mkdir()
    (d / "empty.onnx").write_bytes(b"")
    (d / "text.onnx").write_text("this is not an onnx file\n")
    import onnx
    from onnx import helper

    onnx.save(helper.make_model(helper.make_graph([], "g", [], [])), d / "noio.onnx")
    (d / "a_file").write_text("")
    return d


def _cases(d: Path):
    tiny, spec = d / "tiny.py", d / "tiny.yaml"
    onnx_, w = d / "tiny" / "student.onnx", d / "tiny" / "student.safetensors"
    if os.geteuid() == 0:  # root writes everywhere: a file system that refuses everyone
        unwritable = Path("/sys/gpdc-test-out")
    else:
        (d / "locked").mkdir(exist_ok=True)
        (d / "locked").chmod(0o500)
        unwritable = d / "locked" / "out"
    check = ("check", onnx_, "--model", tiny, "--weights", w)
    return {
        # (args, exit code, phrases of the message)
        "build_model_raises": (("expand", d / "raises.py", "--spec", spec), 2,
                               ["build_model() raised ValueError: no such checkpoint: w.pt", "raises.py"]),
        "build_model_needs_arguments": (("expand", d / "args.py", "--spec", spec), 2,
                                        ["needs arguments (width)", "--entry"]),
        "build_model_returns_non_module": (("expand", d / "notmodule.py", "--spec", spec), 2, ["not a torch.nn.Module"]),
        "ratio_1e400": (("compile", tiny, "--spec", d / "inf.yaml", "--out", d / "o_inf"), 2,
                        ["expand.ratio", "finite number > 1, got inf"]),
        "ratio_nan": (("spec", d / "nan.yaml"), 2, ["expand.ratio", "got nan"]),
        "layer_ratio_inf": (("spec", d / "layer_inf.yaml"), 2, ["layer rule '0' has ratio inf"]),
        "spec_not_utf8": (("spec", d / "latin1.yaml"), 2, ["is not UTF-8 text", "latin1.yaml"]),
        "spec_is_a_folder": (("compile", tiny, "--spec", d / "dir.yaml", "--out", d / "o_dir"), 2, ["is a folder"]),
        "onnx_empty": (("check", d / "empty.onnx", "--model", tiny, "--weights", w), 2, ["is empty (0 bytes)"]),
        "onnx_not_onnx": (("check", d / "text.onnx", "--model", tiny, "--weights", w), 2,
                          ["is not a readable ONNX file"]),
        "onnx_no_inputs_outputs": (("check", d / "noio.onnx", "--model", tiny, "--weights", w), 2,
                                   ["has 0 inputs and 0 outputs"]),
        "onnx_of_another_model": (("check", d / "other.onnx", "--model", tiny, "--weights", w), 2,
                                  ["the ONNX file does not match", "has shape [2, 3]", "has [2, 4]"]),
        "onnx_other_weights_same_model": (("check", onnx_, "--model", tiny, "--weights", d / "tiny_other_weights.safetensors"),
                                          1, ['"ok": false', '"max_abs"']),
        "atol_negative": ((*check, "--atol", "-1"), 2, ["Invalid value for '--atol'", ">= 0"]),
        "rtol_negative": ((*check, "--rtol", "-1"), 2, ["Invalid value for '--rtol'", ">= 0"]),
        "atol_nan": ((*check, "--atol", "nan"), 2, ["Invalid value for '--atol'", "finite"]),
        "weights_of_another_model": (("check", onnx_, "--model", tiny, "--weights", d / "other.safetensors"), 2,
                                     ["does not match", "2 keys of the file are not in the model (6.bias, 6.weight)",
                                      "5.weight: file [7, 8], model [4, 8]"]),
        "out_is_a_file": (("compile", tiny, "--spec", spec, "--out", d / "a_file"), 2, ["is a file, not a folder"]),
        "out_unwritable": (("compile", tiny, "--spec", spec, "--out", unwritable), 2, ["cannot write to the output folder"]),
        "out_is_current_folder": (("compile", tiny, "--spec", spec, "--out", "."), 2, ["a folder of its own"]),
        "identity_model": (("compile", d / "identity.py", "--spec", spec, "--out", d / "o_identity"), 2, ["error:"]),
    }


CASES = list(_cases(Path("/x")))


DRIVER = r"""
import json, os, sys, traceback
from gpdc.cli import main
for name, cwd, out, err, args in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:  # what `python -m gpdc ARGS` does, in a process of its own
        os.chdir(cwd)
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        try:
            main(args, prog_name="gpdc")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps([name, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])]), flush=True)
"""


@pytest.fixture(scope="module")
def results(files):
    """Every case's (exit code, stdout, stderr)."""
    cases = _cases(files)
    (files / "cwd").mkdir()
    jobs = [[k, str(files / "cwd" if k == "out_is_current_folder" else ROOT), str(files / f"{k}.out"),
             str(files / f"{k}.err"), [str(a) for a in args]] for k, (args, _, _) in cases.items()]
    if not hasattr(os, "fork"):  # one `python -m gpdc` per case
        return {k: (cases[k], run_cli(*args, cwd=cwd)) for k, cwd, _, _, args in jobs}
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(jobs)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    codes = dict(json.loads(line) for line in r.stdout.splitlines())
    return {k: (cases[k], subprocess.CompletedProcess(args, codes[k], Path(out).read_text(), Path(err).read_text()))
            for k, _, out, err, args in jobs}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_paragraph(case, results, files):
    (args, code, phrases), r = results[case]
    out = r.stdout + r.stderr
    assert r.returncode == code, out
    assert "Traceback" not in out
    for phrase in phrases:
        assert phrase in " ".join(out.split()), out  # rich may wrap long lines: compare whitespace-normalised
    if args[0] == "compile" and case != "out_is_current_folder":  # nothing written, nothing left behind
        out_dir = Path(args[args.index("--out") + 1])
        if case == "out_is_a_file":
            assert out_dir.is_file() and out_dir.read_text() == ""
        else:
            assert not out_dir.exists()
        assert not [e for e in os.listdir(out_dir.parent) if e.startswith(f".{out_dir.name}.gpdc-")]


# -- outputs appear together or not at all -----------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """examples/model.py compiled with specs/example.yaml (ratio 2, stage 2 at 1.5) under umask 002."""
    out = tmp_path_factory.mktemp("recompile") / "out"
    r = run_cli("compile", "examples/model.py", "--spec", "specs/example.yaml", "--out", out, umask=0o002)
    assert r.returncode == 0, r.stderr
    (out / "notes.txt").write_text("mine\n")  # a file of the user's: survives a re-compile
    return out


def _one_complete_set(out: Path) -> float:
    """The folder holds the four files of one run: report.json's ratio is the one the teacher was widened by."""
    assert sorted(os.listdir(out)) == sorted(OWN + ["notes.txt"])
    assert (out / "notes.txt").read_text() == "mine\n"
    assert not leftovers(out)
    report = json.loads((out / "report.json").read_text())
    ratio = report["spec"]["expand"]["ratio"]
    assert load_file(out / "teacher.safetensors")["stem.0.weight"].shape[0] == round(24 * ratio)
    assert load_file(out / "student.safetensors")["stem.0.weight"].shape[0] == 24
    return ratio


def test_outputs_have_the_umask_mode(compiled):
    assert compiled.stat().st_mode & 0o777 == 0o775
    for name in OWN:
        assert (compiled / name).stat().st_mode & 0o777 == 0o664, name


@pytest.mark.parametrize("sig,after,code,message", [
    (signal.SIGINT, "✓ load", 130, "interrupted"),
    (signal.SIGTERM, "✓ expand", 143, "terminated"),
], ids=["SIGINT", "SIGTERM"])
def test_interrupted_recompile_keeps_one_complete_set(compiled, tmp_path, sig, after, code, message):
    spec = tmp_path / "r15.yaml"
    spec.write_text((ROOT / "specs/example.yaml").read_text().replace("ratio: 2.0", "ratio: 1.5"))
    p = subprocess.Popen([sys.executable, "-m", "gpdc", "compile", "examples/model.py", "--spec", str(spec), "--out",
                          str(compiled)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in p.stderr:  # signal the run once it is past the given stage: the staging folder exists
        seen.append(line)
        if after in line:
            p.send_signal(sig)
            break
    stdout, stderr = p.communicate(timeout=120)
    stderr = "".join(seen) + stderr
    assert p.returncode == code, stderr
    assert message in stderr and "Traceback" not in stderr
    assert _one_complete_set(compiled) == 2.0  # interrupted before the swap: the old set, untouched


@pytest.mark.parametrize("name", ["teacher.safetensors", "student.safetensors"])
def test_full_disk_is_bad_input_and_keeps_the_old_outputs(files, tmp_path, monkeypatch, name):
    import gpdc.compile
    from gpdc.cli import main

    out = tmp_path / "out"
    runner = CliRunner()
    args = ["compile", str(files / "tiny.py"), "--spec", str(files / "tiny.yaml"), "--out", str(out)]
    assert runner.invoke(main, args).exit_code == 0
    before = {n: (out / n).read_bytes() for n in OWN}

    real = gpdc.compile.save_file

    def full(tensors, path):
        if Path(path).name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path)

    monkeypatch.setattr(gpdc.compile, "save_file", full)
    r = runner.invoke(main, args)
    assert r.exit_code == 2, r.output
    assert f"cannot write {out / name}: No space left on device" in " ".join(r.stderr.split())
    assert "free some space or choose another --out" in r.stderr
    assert {n: (out / n).read_bytes() for n in OWN} == before and not leftovers(out)


@pytest.mark.parametrize("error,code,phrase", [
    (ValueError("kaboom"), 2, "internal error in gpdc: ValueError: kaboom"),
    (MemoryError(), 2, "out of memory"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"), 2, "Lower expand.ratio"),
    (KeyboardInterrupt(), 130, "interrupted"),
], ids=["internal_error", "MemoryError", "torch_out_of_memory", "KeyboardInterrupt"])
def test_crashes_are_one_paragraph(files, tmp_path, monkeypatch, error, code, phrase):
    import gpdc.compile
    from gpdc.cli import main

    def crash(*a, **k):
        raise error

    monkeypatch.setattr(gpdc.compile, "expand", crash)
    out = tmp_path / "out"
    args = ["compile", str(files / "tiny.py"), "--spec", str(files / "tiny.yaml"), "--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == code, r.output
    assert phrase in " ".join(r.stderr.split()) and "Traceback" not in r.output
    assert not out.exists() and not leftovers(out)
    if code == 2 and isinstance(error, ValueError):
        r = CliRunner(env={"GPDC_DEBUG": "1"}).invoke(main, args)
        assert r.exit_code == 2 and "Traceback" in r.stderr and "kaboom" in r.stderr


def test_swap_without_renameat2_keeps_the_users_files(tmp_path, monkeypatch):
    from gpdc import outdir

    out = tmp_path / "out"
    out.mkdir()
    for name in OWN:
        (out / name).write_text("old")
    (out / "sub").mkdir()
    (out / "sub" / "keep.txt").write_text("mine")
    monkeypatch.setattr(outdir, "_rename_exchange", lambda a, b: False)
    with outdir.StagedDir() as staged:
        staged.open(out)
        for name in OWN:
            staged.write(name, lambda p: Path(p).write_text("new"))
        staged.commit()
    assert sorted(os.listdir(out)) == sorted(OWN + ["sub"])
    assert all((out / n).read_text() == "new" for n in OWN) and (out / "sub" / "keep.txt").read_text() == "mine"
    assert not leftovers(out)
