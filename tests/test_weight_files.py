"""Weight files: a file that is no readable checkpoint, or holds NaN/Inf, fails with one clear error naming it; atomic
writes give the usual file mode and clean up the temp files of writers that were killed."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tool_add_control_sd21
from fcdiffusion.core.weights import load_teacher
from ldm.checkpoint import (
    CheckpointMismatchError,
    CheckpointReadError,
    NonFiniteWeightsError,
    load_checkpoint,
    load_state_dict,
    save_state_dict,
)
from ldm.util import atomic_path
from tests.helpers import ROOT, TINY_CONFIG, teacher_paths

HINT = "download it again from huggingface.co"


@pytest.fixture(scope="module")
def intact(tiny_files, tmp_path_factory) -> dict[str, Path]:
    """Real weight files of each format: the tiny SD checkpoint (.ckpt), its safetensors copy, the text tower (.bin)."""
    safetensors = tmp_path_factory.mktemp("formats") / "v2-1_tiny.safetensors"
    save_state_dict(load_state_dict(tiny_files.sd), safetensors)
    return {".ckpt": tiny_files.sd, ".safetensors": safetensors, ".bin": tiny_files.clip}


def damaged(source: Path, folder: Path, damage: str) -> Path:
    """A copy of `source` (same extension) that is empty, its first half only, or a text file."""
    path = folder / f"{damage}{source.suffix}"
    data = source.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                      "text": b"<!DOCTYPE html>\n<title>502 Bad Gateway</title>\n"}[damage])
    return path


@pytest.mark.parametrize("damage, says", [("empty", "the file is empty"), ("truncated", "truncated"),
                                          ("text", "a text file, not a checkpoint ('<!DOCTYPE html>')")])
@pytest.mark.parametrize("extension", [".ckpt", ".safetensors", ".bin"])
def test_unreadable_files_raise_one_error_naming_file_size_and_what_it_seems(intact, tmp_path, extension, damage,
                                                                            says):
    assert load_state_dict(intact[extension])  # the intact file reads
    path = damaged(intact[extension], tmp_path, damage)
    with pytest.raises(CheckpointReadError) as info:
        load_checkpoint(path, hint=HINT)
    message = str(info.value)
    assert isinstance(info.value, CheckpointMismatchError)  # what the scripts' handlers catch
    assert f"{path} ({path.stat().st_size:,} bytes)" in message
    assert says.replace(" ('", " (its first line: '") in message if damage == "text" else says in message
    assert message.endswith(HINT)


def test_a_file_of_the_other_format_says_which_extension_it_needs(intact, tmp_path):
    misnamed = tmp_path / "weights.ckpt"
    misnamed.write_bytes(intact[".safetensors"].read_bytes())
    with pytest.raises(CheckpointReadError, match="a safetensors file, not a PyTorch checkpoint: give it the "
                                                  r"\.safetensors extension"):
        load_checkpoint(misnamed)


def test_a_missing_file_still_raises_file_not_found_with_its_hint(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_checkpoint(tmp_path / "v2-1_512-ema-pruned.ckpt", hint=HINT)
    assert str(info.value) == f"checkpoint not found: {tmp_path / 'v2-1_512-ema-pruned.ckpt'}\n{HINT}"


def test_tool_add_control_reports_a_truncated_sd_checkpoint_without_a_trace(intact, tmp_path, capsys):
    source = damaged(intact[".safetensors"], tmp_path, "truncated")
    out = tmp_path / "init.ckpt"
    assert tool_add_control_sd21.main([str(source), str(out), "--config", TINY_CONFIG]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read checkpoint {source}") and "a safetensors file, truncated" in err
    assert "Traceback" not in err and not out.exists()


def test_weights_with_nan_or_inf_are_refused_at_load_naming_up_to_five_keys(workdir, tmp_path):
    state, metadata = load_checkpoint(teacher_paths(workdir / "logs")["low_pass"])
    nan_key, inf_key = "model.diffusion_model.out.2.weight", "control_model.zero_convs_add.0.0.weight"
    broken = {**state, nan_key: state[nan_key].clone().fill_(float("nan")),
              inf_key: state[inf_key].clone().index_fill_(0, torch.tensor([0]), float("inf"))}
    path = tmp_path / "low_pass_nan.ckpt"
    save_state_dict(broken, path, metadata)
    with pytest.raises(NonFiniteWeightsError) as info:
        load_teacher(path, "low_pass")
    assert str(info.value).startswith(f"{path} holds NaN or infinite values in 2 tensors: {nan_key}, {inf_key};")

    chosen = [k for k in state if k.startswith("control_model.input_blocks.")][:8]
    path = tmp_path / "many.safetensors"
    save_state_dict({k: v.clone().fill_(float("nan")) if k in chosen else v for k, v in state.items()}, path)
    with pytest.raises(NonFiniteWeightsError, match="in 8 tensors: ") as info:
        load_state_dict(path)
    named = str(info.value).split("tensors: ")[1].split(" and 3 more;")[0].split(", ")
    assert len(named) == 5 and set(named) <= set(chosen)


def test_tool_add_control_refuses_an_sd_checkpoint_with_nan(tiny_files, tmp_path, capsys):
    state = load_state_dict(tiny_files.sd)
    key = "model.diffusion_model.out.2.weight"
    state[key] = state[key].clone().fill_(float("nan"))
    source = tmp_path / "nan_sd.ckpt"
    save_state_dict(state, source)
    assert tool_add_control_sd21.main([str(source), str(tmp_path / "init.ckpt"), "--config", TINY_CONFIG]) == 1
    assert f"error: {source} holds NaN or infinite values in 1 tensors: {key};" in capsys.readouterr().err
    assert not (tmp_path / "init.ckpt").exists()


# ---- atomic writes ----------------------------------------------------------------------------------------------
def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_mode_a_plain_open_would(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_state_dict({"w": torch.ones(2)}, tmp_path / "new.safetensors")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        assert os.umask(umask) == umask  # the write left the umask as it was
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "new.safetensors") == mode_of(tmp_path / "plain.txt") == mode


def test_atomic_rewrite_keeps_the_existing_files_mode(tmp_path):
    path = tmp_path / "model.ckpt"
    save_state_dict({"w": torch.ones(2)}, path)
    path.chmod(0o640)
    save_state_dict({"w": torch.zeros(2)}, path)
    assert mode_of(path) == 0o640 and not load_state_dict(path)["w"].any()


def killed_mid_write(path: Path) -> None:
    """Run a process that starts an atomic write of `path` and is killed (SIGKILL) halfway through it."""
    code = ("import os, signal, sys\nfrom ldm.util import atomic_path\nwith atomic_path(sys.argv[1]) as tmp:\n"
            "    open(tmp, 'w').write('half of it')\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT)
    assert result.returncode == -signal.SIGKILL


def test_the_next_write_removes_temp_files_of_killed_writers_only(tmp_path):
    target, other = tmp_path / "student.safetensors", tmp_path / "student.safetensors.1"
    killed_mid_write(target)
    killed_mid_write(other)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and all(name.startswith(".student.safetensors.") and name.endswith(".tmp") for name in left)
    assert not target.exists()
    other_leftover = next(p for p in tmp_path.iterdir() if p.name.startswith(".student.safetensors.1."))

    with atomic_path(target) as live:  # a write of this (living) process in progress
        Path(live).write_text("in progress")
        save_state_dict({"w": torch.ones(2)}, target)  # removes the killed writer's file, not the live one
        assert Path(live).read_text() == "in progress"
        assert sorted(tmp_path.iterdir()) == sorted([target, Path(live), other_leftover])
    assert target.read_text() == "in progress"
    assert sorted(tmp_path.iterdir()) == sorted([target, other_leftover])  # another target's leftover is its own


def test_files_naming_classes_by_their_modules_before_the_layered_package_still_load(distilled, tmp_path):
    """A student file whose recorded config says `fcdiffusion.student.FCDiffusionStudent` (the flat layout's module
    names) loads as the same model: `MOVED_TARGETS` renames them, and each new name imports."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fcdiffusion.core.paths import student_file
    from fcdiffusion.core.weights import MOVED_TARGETS, load_student
    from ldm.util import get_obj_from_str

    for old, new in MOVED_TARGETS.items():
        assert old.split(".", 1)[1] == new.split(".core.", 1)[1] and get_obj_from_str(new) is not None
    source = student_file(distilled)
    with safe_open(str(source), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    recorded = metadata["fcdiffusion.config"]
    old_style = recorded.replace("fcdiffusion.core.", "fcdiffusion.")
    assert old_style != recorded and "fcdiffusion.student.FCDiffusionStudent" in old_style
    old_file = tmp_path / "old_layout_student.safetensors"
    save_file(tensors, str(old_file), {**metadata, "fcdiffusion.config": old_style})
    new, old = load_student(source), load_student(old_file)
    assert type(old) is type(new)
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))
