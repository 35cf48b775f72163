"""The demo (app.py, fcdiffusion/apps/demo_app.py): served on a free local port and driven through gradio_client, it
shows source | decoded control | result per mode, the same pictures test_distillation.py writes, and answers bad
input with a clear message while it keeps serving."""
from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from fcdiffusion.apps.demo_app import (
    DemoInputError,
    MissingWeightsError,
    build_app,
    launch,
    load_demo,
    read_photo,
    weight_files,
)
from fcdiffusion.core.images import to_uint8
from fcdiffusion.core.paths import student_file
from fcdiffusion.train.dataset import prepare_image
from fcdiffusion.train.demo_data import load_photo
from tests.helpers import teacher_paths
from tests.test_inference import load_script

MAX_PIXELS = 200_000  # the served demo's limit: the test photo (451x300) fits, a 500x500 one does not
PROMPT = "a watercolor painting of a cat"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """scikit-image's cat (451x300, not square) as a PNG."""
    path = tmp_path_factory.mktemp("app_photos") / "chelsea.png"
    Image.fromarray(load_photo("chelsea")).save(path)
    return path


@pytest.fixture(scope="module")
def served(distilled, workdir):
    """The demo serving the tiny student and two of the tiny teachers, and a client connected to it."""
    teachers = teacher_paths(workdir / "logs")
    student, chosen = weight_files(student_file(distilled), None,
                                   {"low_pass": teachers["low_pass"], "high_pass": teachers["high_pass"]})
    demo = load_demo(student, chosen, torch.device("cpu"), max_pixels=MAX_PIXELS)
    app = build_app(demo)
    url = launch(app, "127.0.0.1", free_port(), block=False)
    try:
        yield SimpleNamespace(demo=demo, client=Client(url, verbose=False))
    finally:
        app.close()


def translate(served, image, prompt=PROMPT, modes=("low_pass", "high_pass"), model="student", steps=3,
              guidance=None, seed=7):
    return served.client.predict(image, prompt, list(modes), model, steps, guidance, seed, api_name="/translate")


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_student_shows_source_control_and_result_per_mode_as_the_script_writes_them(served, photo, distilled,
                                                                                    tmp_path):
    gallery, timing = translate(served, handle_file(photo))
    captions = [item["caption"] for item in gallery]
    assert [c.split(" (")[0] for c in captions] == [f"{mode}: {kind}" for mode in ("low_pass", "high_pass")
                                                    for kind in ("source", "decoded control", "result")]
    images = [pixels(item["image"]) for item in gallery]
    assert all(image.shape == (128, 128, 3) for image in images)
    with Image.open(photo) as source:
        expected_source = to_uint8(torch.from_numpy(prepare_image(source, 128)).permute(2, 0, 1))
    assert np.array_equal(images[0], expected_source) and np.array_equal(images[3], expected_source)
    assert not np.array_equal(images[2], images[5])  # the modes differ
    assert "student" in timing and "3 steps" in timing and "low_pass" in timing and "total" in timing

    # test_distillation.py on the same photo, prompt, steps and seed writes the same control and result.
    photo_dir = tmp_path / "in"
    photo_dir.mkdir()
    (photo_dir / photo.name).write_bytes(photo.read_bytes())
    out = tmp_path / "out"
    assert load_script().main(["--input_dir", str(photo_dir), "--prompt", PROMPT, "--mode", "high_pass",
                               "--student", str(student_file(distilled)), "--resolution", "128", "--steps", "3",
                               "--seed", "7", "--out_dir", str(out)]) == 0
    assert np.array_equal(images[4], pixels(out / "chelsea_high_pass_control.png"))
    assert np.array_equal(images[5], pixels(out / "chelsea_high_pass.png"))


def test_teachers_take_a_guidance_scale_and_the_student_refuses_another(served, photo):
    gallery, timing = translate(served, handle_file(photo), modes=["high_pass"], model="teachers", steps=2,
                                guidance=3.0)
    assert [item["caption"].split(" (")[0] for item in gallery] == [
        "high_pass: source", "high_pass: decoded control", "high_pass: result"]
    assert pixels(gallery[2]["image"]).shape == (128, 128, 3)
    assert "teachers" in timing and "guidance 3" in timing
    with pytest.raises(AppError, match="distilled at a fixed guidance scale"):
        translate(served, handle_file(photo), guidance=5.0)  # a fixed-w student takes its own w only
    assert translate(served, handle_file(photo), modes=["low_pass"], steps=1,
                     guidance=served.demo.served["student"].guidance_scale)[0]
    with pytest.raises(AppError, match="finite number >= 0") as refused:  # as text, not HTML entities
        translate(served, handle_file(photo), modes=["high_pass"], model="teachers", guidance=-1.0)
    assert "&gt;" not in str(refused.value)
    with pytest.raises(AppError, match="serve.*low_pass, high_pass, not mini_pass"):
        translate(served, handle_file(photo), modes=["mini_pass"], model="teachers")


def test_bad_input_gets_a_clear_message_and_the_server_keeps_serving(served, photo, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not a picture")
    huge = tmp_path / "huge.png"
    Image.new("RGB", (500, 500)).save(huge)
    cases = [((None,), "no photo"), ((handle_file(not_an_image),), "notes.png is not an image file"),
             ((handle_file(huge),), r"500x500 = 0.2 megapixels, over the demo's limit of 0.2 megapixels"),
             ((handle_file(photo), "   "), "the prompt is empty"),
             ((handle_file(photo), PROMPT, []), "no control mode picked")]
    for args, message in cases:
        with pytest.raises(AppError, match=message):
            translate(served, *args)
    gallery, _ = translate(served, handle_file(photo), modes=["mid_pass"], steps=1)
    assert len(gallery) == 3


def test_a_damaged_or_small_photo_is_reported(photo, tmp_path):
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(photo.read_bytes()[:2000])
    with pytest.raises(DemoInputError, match="truncated.png as an image: it looks damaged"):
        read_photo(truncated, 128)
    small = tmp_path / "small.png"
    Image.new("RGB", (100, 60)).save(small)
    image, note = read_photo(small, 128)
    assert image.shape == (128, 128, 3) and "(100x60) is smaller than the model's 128 px" in note
    assert read_photo(photo, 128)[1] == ""


def test_missing_weights_tell_the_user_what_to_run_or_pass(tmp_path, monkeypatch, capsys):
    import app

    monkeypatch.chdir(tmp_path)  # no quickstart outputs here
    assert app.main([]) == 1
    error = capsys.readouterr().err
    assert "outputs/quickstart/lightning_logs/fcdiffusion_distill_checkpoint/student.safetensors" in error
    assert "make quickstart" in error and "--student" in error
    assert app.main(["--teacher_dir", "logs"]) == 1
    assert "fcdiffusion_low_pass_checkpoint/last.ckpt" in capsys.readouterr().err
    with pytest.raises(MissingWeightsError, match="elsewhere.ckpt"):
        weight_files(None, None, {"mid_pass": "elsewhere.ckpt"})
