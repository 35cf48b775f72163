"""test_distillation.py's input folder and flags: every input is translated or reported, nothing is overwritten,
and a bad command line is one `error:` line before any model is loaded."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from fcdiffusion.core.inference import Translator
from fcdiffusion.core.paths import student_file
from fcdiffusion.train.image_folder import prompted_images
from tests.test_inference import load_script


@pytest.fixture(scope="module")
def script():
    return load_script()


def save_photo(path: Path, name: str, caption: str | None = None, encoding: str = "utf-8") -> None:
    """skimage's photo `name` at quarter size (so translations stay fast), with an optional caption beside it."""
    Image.fromarray(np.asarray(getattr(skimage.data, name)())[::4, ::4]).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding=encoding)


@pytest.fixture
def record_prompts(monkeypatch) -> list[str]:
    """The prompts the script hands to the translator, in order."""
    prompts = []
    original = Translator.__call__
    monkeypatch.setattr(Translator, "__call__", lambda self, images, texts, *a, **k: prompts.extend(texts)
                        or original(self, images, texts, *a, **k))
    return prompts


def run_student(script, distilled: Path, photos: Path, out: Path) -> int:
    return script.main(["--input_dir", str(photos), "--student", str(student_file(distilled)), "--mode", "low_pass",
                        "--steps", "1", "--resolution", "128", "--batch_size", "8", "--out_dir", str(out)])


def test_prompted_images_reports_every_file_it_does_not_translate(tmp_path: Path) -> None:
    save_photo(tmp_path / "coffee.gif", "coffee", "a cup of coffee")
    save_photo(tmp_path / "rocket.png", "rocket")  # no caption
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "orphan.txt").write_text("a caption is not an input")
    (tmp_path / ".thumbnail.png").write_bytes(b"hidden files are not inputs")
    (tmp_path / "sub").mkdir()
    save_photo(tmp_path / "sub" / "camera.png", "camera", "subfolders are not inputs")

    pairs, problems = prompted_images(tmp_path)
    assert pairs == [(tmp_path / "coffee.gif", "a cup of coffee")]
    assert len(problems) == 2
    assert "notes.pdf" in problems[0] and "not a supported image type" in problems[0]
    assert "rocket.png" in problems[1] and "no prompt" in problems[1]
    pairs, problems = prompted_images(tmp_path, "a painting")
    assert [p.name for p, _ in pairs] == ["coffee.gif", "rocket.png"] and len(problems) == 1


def test_colliding_names_keep_every_output_and_unsupported_files_are_counted(distilled, script, tmp_path, capsys):
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    save_photo(photos / "x.png", "astronaut", "a photo")
    save_photo(photos / "x.jpg", "chelsea")  # shares x.txt
    save_photo(photos / "coffee.gif", "coffee", "a cup of coffee")
    (photos / "notes.pdf").write_bytes(b"%PDF-1.4")
    (photos / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")

    assert run_student(script, distilled, photos, out) == 0
    captured = capsys.readouterr()
    assert "x_png_<mode>.png" in captured.err and "x_jpg_<mode>.png" in captured.err
    assert "notes.pdf" in captured.err and "not a supported image type" in captured.err
    assert captured.out.strip().splitlines()[-1] == f"translated 3 image(s) into {out}; skipped 1"
    kinds = ("low_pass", "low_pass_control", "grid")
    assert sorted(p.name for p in out.iterdir()) == sorted(["settings.json", *(f"{n}_{k}.png" for k in kinds
                                                                                for n in ("x_png", "x_jpg", "coffee"))])
    control = {name: np.asarray(Image.open(out / f"{name}_low_pass_control.png")) for name in ("x_png", "x_jpg")}
    assert np.abs(control["x_png"].astype(int) - control["x_jpg"]).mean() > 10  # two photos, not one written twice


def test_a_bad_caption_skips_only_its_image_and_a_byte_order_mark_is_dropped(distilled, script, tmp_path, capsys,
                                                                           record_prompts):
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    save_photo(photos / "astronaut.png", "astronaut", "an astronaut")
    save_photo(photos / "chelsea.png", "chelsea", "a cat", encoding="utf-8-sig")  # as Windows Notepad saves it
    save_photo(photos / "rocket.png", "rocket", "une fusée", encoding="latin-1")  # not UTF-8

    assert run_student(script, distilled, photos, out) == 0
    captured = capsys.readouterr()
    assert "rocket.png" in captured.err and "unreadable caption" in captured.err
    assert captured.out.strip().splitlines()[-1] == f"translated 2 image(s) into {out}; skipped 1"
    assert record_prompts == ["an astronaut", "a cat"]
    assert sorted(p.name for p in out.glob("*_low_pass.png")) == ["astronaut_low_pass.png", "chelsea_low_pass.png"]


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--batch_size", "-2"], "--batch_size must be at least 1, got -2"),
    (["--resolution", "100"], "--resolution must be a positive multiple of 64, got 100"),
    (["--resolution", "0"], "--resolution must be a positive multiple of 64, got 0"),
    (["--resolution", "-128"], "--resolution must be a positive multiple of 64, got -128"),
    (["--out_dir", "{tmp}/taken"], "is a file"),
    (["--out_dir", "{tmp}/taken/out"], "is a file"),
    (["--out_dir", "{tmp}/locked/out"], "not writable"),
])
def test_bad_flags_are_one_error_line_before_any_model_is_loaded(script, tmp_path, monkeypatch, capsys, flags,
                                                                  message):
    save_photo(tmp_path / "astronaut.png", "astronaut", "an astronaut")
    (tmp_path / "taken").write_text("a file where the outputs would go")
    (tmp_path / "locked").mkdir(mode=0o555)
    if message == "not writable" and os.access(tmp_path / "locked", os.W_OK):
        monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: False)  # root ignores permission bits
    loaded = []
    monkeypatch.setattr(script, "load_model", lambda *args: loaded.append(args) or pytest.fail("model loaded"))
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    assert script.main(["--input_dir", str(tmp_path), "--student", str(tmp_path / "student.safetensors"),
                        *flags]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and message in error[0]
    assert not loaded and not (tmp_path / "locked" / "out").exists()


def test_good_flags_reach_the_model_and_create_nothing_first(script, tmp_path, monkeypatch) -> None:
    save_photo(tmp_path / "astronaut.png", "astronaut", "an astronaut")

    def load_model(*args):
        raise FileNotFoundError("no student here")

    monkeypatch.setattr(script, "load_model", load_model)
    out = tmp_path / "new" / "out"
    assert script.main(["--input_dir", str(tmp_path), "--student", "student.safetensors", "--batch_size", "1",
                        "--resolution", "192", "--out_dir", str(out)]) == 1
    assert not (tmp_path / "new").exists()
