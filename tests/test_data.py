"""Index building, the training dataset and the demo export, on scikit-image's shipped photos."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import training_data_prepare
from fcdiffusion.dataset import FCDiffusionDataset
from fcdiffusion.demo_data import CAPTIONS, export_demo_dataset


def save(path: Path, image: np.ndarray, caption: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")


@pytest.fixture
def photo_tree(tmp_path: Path) -> Path:
    """``tmp/data`` in img2dataset layout plus every kind of bad entry; returns tmp_path."""
    data = tmp_path / "data"
    save(data / "00000" / "astronaut.jpg", skimage.data.astronaut(), "an astronaut\n")
    save(data / "00000" / "chelsea.png", skimage.data.chelsea(), "a  tabby\ncat ")  # whitespace gets collapsed
    save(data / "00001" / "coffee.webp", skimage.data.coffee(), "a cup of coffee")
    save(data / "rocket.bmp", skimage.data.rocket(), "a rocket")  # directly in the root
    save(data / "00001" / "uncaptioned.png", skimage.data.camera())
    save(data / "00000" / "blank.png", skimage.data.coins(), " \n")
    (data / "00001" / "broken.jpg").write_bytes(np.random.default_rng(0).bytes(4096))
    (data / "00001" / "broken.txt").write_text("never decoded")
    (data / "00001" / "orphan.txt").write_text("a caption without an image")
    save(data / ".cache" / "hidden.png", skimage.data.moon(), "hidden folders are ignored")
    return tmp_path


EXPECTED = [
    {"img_path": "data/00000/astronaut.jpg", "prompt": "an astronaut"},
    {"img_path": "data/00000/chelsea.png", "prompt": "a tabby cat"},
    {"img_path": "data/00001/coffee.webp", "prompt": "a cup of coffee"},
    {"img_path": "data/rocket.bmp", "prompt": "a rocket"},
]


def test_prepare_writes_valid_pairs_and_counts_skips(photo_tree: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(photo_tree)
    assert training_data_prepare.main(["--data_root", "data", "--output", "training_data.json"]) == 0
    output = photo_tree / "training_data.json"
    lines = output.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == EXPECTED
    summary = capsys.readouterr().out
    for expected in ["found 7 images", "wrote 4 pairs", "skipped no_caption: 1", "skipped empty_caption: 1",
                     "skipped corrupt_image: 1", "skipped unreadable_caption: 0"]:
        assert expected in summary

    # Re-running (from another directory, with absolute paths) rewrites the same bytes, never appends.
    first = output.read_bytes()
    monkeypatch.chdir(photo_tree / "data")
    assert training_data_prepare.main(["--data_root", str(photo_tree / "data"), "--output", str(output)]) == 0
    assert output.read_bytes() == first
    assert not [p for p in photo_tree.iterdir() if p.name.endswith(".tmp")]


def test_prepare_fails_cleanly_without_data(tmp_path: Path) -> None:
    assert training_data_prepare.main(["--data_root", str(tmp_path / "missing"), "--output",
                                       str(tmp_path / "out.json")]) == 1
    (tmp_path / "empty").mkdir()
    assert training_data_prepare.main(["--data_root", str(tmp_path / "empty"), "--output",
                                       str(tmp_path / "out.json")]) == 1


@pytest.fixture
def index(photo_tree: Path) -> Path:
    output = photo_tree / "training_data.json"
    assert training_data_prepare.main(["--data_root", str(photo_tree / "data"), "--output", str(output)]) == 0
    return output


def test_dataset_returns_centre_cropped_rgb_in_range(index: Path, monkeypatch) -> None:
    monkeypatch.chdir(index.parent / "data")  # paths resolve against the index, not the working directory
    dataset = FCDiffusionDataset(index, resolution=64)
    assert len(dataset) == 4
    for i, expected in enumerate(EXPECTED):
        item = dataset[i]
        image = item["jpg"]
        assert image.shape == (64, 64, 3) and image.dtype == np.float32
        assert -1.0 <= image.min() < -0.3 and 0.3 < image.max() <= 1.0
        assert item["txt"] == expected["prompt"]
    assert dataset.skipped == 0

    # chelsea is 300 x 451: the result is the centre square, not the whole photo squashed.
    chelsea = skimage.data.chelsea()
    left = (chelsea.shape[1] - chelsea.shape[0]) // 2
    centre = Image.fromarray(chelsea[:, left : left + chelsea.shape[0]]).resize((64, 64), Image.Resampling.LANCZOS)
    squashed = Image.fromarray(chelsea).resize((64, 64), Image.Resampling.LANCZOS)
    as_float = lambda im: np.asarray(im, dtype=np.float32) / 127.5 - 1.0  # noqa: E731
    got = dataset[1]["jpg"]
    assert np.abs(got - as_float(centre)).mean() < 0.03
    assert np.abs(got - as_float(squashed)).mean() > 2 * np.abs(got - as_float(centre)).mean()

    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch["jpg"].shape == (2, 64, 64, 3) and batch["txt"] == ["an astronaut", "a tabby cat"]
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def write_index(path: Path, names: list[str]) -> Path:
    path.write_text("".join(json.dumps({"img_path": n, "prompt": n}) + "\n" for n in names), encoding="utf-8")
    return path


def test_dataset_skips_bad_images_and_counts_them(photo_tree: Path, caplog) -> None:
    index = write_index(photo_tree / "mixed.json", ["data/00000/astronaut.jpg", "data/00001/broken.jpg",
                                                    "data/gone.png", "data/00000/chelsea.png"])
    dataset = FCDiffusionDataset(index, resolution=32)
    with caplog.at_level(logging.WARNING, logger="fcdiffusion.dataset"):
        item = dataset[1]
    assert item["txt"] == "data/00000/chelsea.png"  # the next good sample stands in
    assert item["jpg"].shape == (32, 32, 3)
    assert dataset.skipped == 2
    assert "broken.jpg" in caplog.text and "gone.png" in caplog.text
    dataset[2]
    assert dataset.skipped == 3 and dataset.failures[str(photo_tree / "data" / "gone.png")] == 2


def test_dataset_raises_when_everything_fails(photo_tree: Path) -> None:
    bad = ["data/00001/broken.jpg", "data/gone.png", "data/00001/broken.txt"]
    with pytest.raises(RuntimeError, match="consecutive images failed"):
        FCDiffusionDataset(write_index(photo_tree / "bad.json", bad), resolution=32)[0]
    # The retry budget bounds a run of failures even when a good image exists further on.
    index = write_index(photo_tree / "tail.json", bad + ["data/rocket.bmp"])
    with pytest.raises(RuntimeError):
        FCDiffusionDataset(index, resolution=32, max_retries=2)[0]
    assert FCDiffusionDataset(index, resolution=32, max_retries=3)[0]["txt"] == "data/rocket.bmp"


def test_dataset_rejects_a_malformed_index(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"img_path": "a.png", "prompt": "a"}\n{"path": "b.png"}\n')
    with pytest.raises(ValueError, match="bad.json:2"):
        FCDiffusionDataset(tmp_path / "bad.json")


def test_export_demo_dataset_is_idempotent(tmp_path: Path) -> None:
    names = ["astronaut", "camera", "motorcycle_left"]
    assert export_demo_dataset(tmp_path, names) == 6
    folder = tmp_path / "00000"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}.{s}" for n in names for s in ("png", "txt"))
    camera = np.asarray(Image.open(folder / "camera.png"))
    assert camera.shape == (512, 512, 3) and (camera[..., 0] == camera[..., 2]).all()  # gray -> RGB
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "astronaut.png")), skimage.data.astronaut())
    assert (folder / "astronaut.txt").read_text(encoding="utf-8").strip() == CAPTIONS["astronaut"]

    stamps = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert export_demo_dataset(tmp_path, names) == 0
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    (folder / "camera.txt").write_text("stale caption")
    assert export_demo_dataset(tmp_path, names) == 1
    with pytest.raises(ValueError, match="available"):
        export_demo_dataset(tmp_path, ["lena"])


def test_full_demo_export_feeds_prepare_and_dataset(tmp_path: Path) -> None:
    assert export_demo_dataset(tmp_path / "demo") == 2 * len(CAPTIONS)
    output = tmp_path / "demo.json"
    assert training_data_prepare.main(["--data_root", str(tmp_path / "demo"), "--output", str(output)]) == 0
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert {Path(r["img_path"]).stem: r["prompt"] for r in records} == CAPTIONS
    dataset = FCDiffusionDataset(output, resolution=16)
    assert all(dataset[i]["jpg"].shape == (16, 16, 3) for i in range(len(dataset))) and dataset.skipped == 0
