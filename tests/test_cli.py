"""The command-line skeleton every script shares (fcdiffusion/cli.py): `--help` works, a known error is one
`error: ...` and status 1, argparse's own usage errors stay status 2."""
from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import sys
from pathlib import Path

import pytest

from fcdiffusion import cli
from fcdiffusion.train.training import TrainingStopped
from tests.helpers import ROOT

# Every script, with arguments that fail fast on a known error (before any model is built) and what it says.
SCRIPTS = {
    "fcdiffusion_train.py": (["--config", "{tmp}/missing.yaml"], "config file not found"),
    "fcdiffusion_distill.py": (["--config", "{tmp}/missing.yaml"], "config file not found"),
    "train_sd.py": (["--config", "{tmp}/missing.yaml"], "config file not found"),
    "distill_tiny_vae.py": (["--config", "{tmp}/missing.yaml"], "config file not found"),
    "test_distillation.py": (["--input_dir", "{tmp}/missing", "--student", "s.safetensors"], "input folder not found"),
    "evaluate.py": (["--results", "{tmp}/missing", "--input_dir", "{tmp}"], "--results folder not found"),
    "export_delta.py": (["{tmp}/model.ckpt", "{tmp}/delta.ckpt"], "must be a .safetensors file"),
    "tool_add_control_sd21.py": (["{tmp}/sd.ckpt", "{tmp}/taken.ckpt"], "exists; pass --force"),
    "training_data_prepare.py": (["--data_root", "{tmp}/missing"], "is not a directory"),
    "app.py": (["--student", "{tmp}/student.safetensors"], "weight files are missing"),
    "quickstart.py": (["--root", "{tmp}", "--out", "{tmp}/out", "--min_free_gb", "1e9"], "refused to start"),
    "benchmarks/distillation_benchmark.py": (["--tiny_config", "{tmp}/missing.yaml"], "config file not found"),
    "docs/take_screenshot.py": (["--chromium", ""], "no Chromium found"),
    "benchmarks/memory_benchmark.py": (["--target", "500", "--records", "{tmp}/records.jsonl"],
                                       "--target and --resolutions must be multiples of 64"),
}
FORWARDS = {"docs/take_screenshot.py"}  # passes the arguments it does not know on to app.py


def load(script: str):
    """The script as a module (by path: some are not in a package, and pytest owns the name test_distillation)."""
    spec = importlib.util.spec_from_file_location(f"script_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_script_with_a_main_is_covered():
    scripts = [p for p in [*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("docs/*.py")]
               if "def main(" in p.read_text()]
    assert sorted(str(p.relative_to(ROOT)) for p in scripts) == sorted(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_a_known_error_and_a_usage_error(script, tmp_path, capsys):
    module = load(script)
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage:")

    (tmp_path / "taken.ckpt").write_text("an earlier output")
    args, message = SCRIPTS[script]
    assert module.main([a.format(tmp=tmp_path) for a in args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err

    if script in FORWARDS:
        return
    with pytest.raises(SystemExit) as refused:
        module.main([*(a.format(tmp=tmp_path) for a in args), "--no_such_flag"])
    assert refused.value.code == 2 and "--no_such_flag" in capsys.readouterr().err


def run_with(run) -> int:
    return cli.main(cli.parser("a script"), run, [])


def test_main_maps_known_errors_to_status_1_and_a_run_error_to_its_own(capsys):
    assert run_with(lambda args, rest: None) == 0
    assert run_with(lambda args, rest: 3) == 3

    def refuse(args, rest):
        raise cli.UsageError("--steps must be at least 1")

    assert run_with(refuse) == 1
    assert capsys.readouterr().err == "error: --steps must be at least 1\n"

    def interrupted(args, rest):
        raise TrainingStopped("stopped by SIGTERM at step 3; progress saved", 143)

    assert run_with(interrupted) == 143
    assert capsys.readouterr().err == "interrupted: stopped by SIGTERM at step 3; progress saved\n"

    def disk_full(args, rest):  # e.g. a checkpoint save on a disk someone else filled
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "logs/last.ckpt")

    assert run_with(disk_full) == 1
    assert capsys.readouterr().err.startswith("error: could not write logs/last.ckpt: No space left on device;")

    def bug(args, rest):
        raise RuntimeError("a bug keeps its traceback")

    with pytest.raises(RuntimeError, match="a bug"):
        run_with(bug)
    with pytest.raises(OSError, match="Bad file descriptor"):  # other OS errors are bugs too
        run_with(lambda args, rest: os.close(-1))


def test_unknown_arguments_are_overrides_forwarded_or_refused():
    seen = []
    arguments = cli.parser("a script")
    arguments.add_argument("--config")

    def run(args: argparse.Namespace, rest: list[str]) -> None:
        seen.append(rest)

    assert cli.main(arguments, run, ["--config", "c.yaml", "a.b=1", "c=x"], unknown="overrides") == 0
    assert cli.main(arguments, run, ["--port", "80", "x"], unknown="forward") == 0
    assert seen == [["a.b=1", "c=x"], ["--port", "80", "x"]]
    for argv, unknown in [(["--max_step", "5"], "overrides"), (["a.b"], "overrides"), (["a.b=1"], "error")]:
        with pytest.raises(SystemExit) as refused:
            cli.main(arguments, run, argv, unknown=unknown)
        assert refused.value.code == 2
    assert len(seen) == 2

