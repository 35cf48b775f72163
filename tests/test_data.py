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
from fcdiffusion.train.dataset import Augment, FCDiffusionDataset, load_image, prepare_image
from fcdiffusion.train.demo_data import CAPTIONS, export_demo_dataset


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


def test_cached_images_are_the_decoded_ones_and_outlive_their_files(index: Path) -> None:
    """`cache_images` changes no pixel (centre crops, and augmented crops drawn from the same seed) and decodes each
    file once: after the files are gone, the cached dataset still serves them, the uncached one skips them."""
    augment = Augment(crop_scale=(0.5, 1.0), hflip=True)
    for kind in (None, augment):
        plain = FCDiffusionDataset(index, resolution=32, augment=kind)
        cached = FCDiffusionDataset(index, resolution=32, augment=kind, cache_images=True)
        for epoch in range(2):
            for i in range(len(plain)):
                torch.manual_seed(10 * epoch + i)
                expected = plain[i]["jpg"]
                torch.manual_seed(10 * epoch + i)
                got = cached[i]
                assert np.array_equal(got["jpg"], expected) and got["path"] == plain[i]["path"]
    centre = FCDiffusionDataset(index, resolution=32, cache_images=True)
    centre[0]["jpg"][:] = 0  # an item is the caller's own array: changing it leaves the cache as it was
    assert np.array_equal(centre[0]["jpg"], FCDiffusionDataset(index, resolution=32)[0]["jpg"])
    for i in range(len(centre)):
        centre[i]
    for record in cached.records:
        Path(record["img_path"]).unlink()
    for dataset in (cached, centre):
        assert [dataset[i]["path"] for i in range(len(dataset))] == [r["img_path"] for r in dataset.records]
        assert dataset.skipped == 0
    with pytest.raises(RuntimeError, match="consecutive images failed"):
        plain[0]


def write_index(path: Path, names: list[str]) -> Path:
    path.write_text("".join(json.dumps({"img_path": n, "prompt": n}) + "\n" for n in names), encoding="utf-8")
    return path


def test_dataset_skips_bad_images_and_counts_them(photo_tree: Path, caplog) -> None:
    index = write_index(photo_tree / "mixed.json", ["data/00000/astronaut.jpg", "data/00001/broken.jpg",
                                                    "data/gone.png", "data/00000/chelsea.png"])
    dataset = FCDiffusionDataset(index, resolution=32)
    with caplog.at_level(logging.WARNING, logger="fcdiffusion.train.dataset"):
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


def test_prepare_never_replaces_an_index_with_fewer_records(index: Path, photo_tree: Path, capsys) -> None:
    good = index.read_bytes()
    capsys.readouterr()
    (photo_tree / "empty").mkdir()
    for root, found in [(photo_tree / "empty", 0), (photo_tree / "data" / "00000", 2)]:  # a typo; a lost shard
        assert training_data_prepare.main(["--data_root", str(root), "--output", str(index)]) == 1
        assert index.read_bytes() == good
        error = capsys.readouterr().err
        assert f"(4 records) with {found} records found" in error and "--force" in error

    # --force replaces it; a scan with as many records or more needs no --force.
    assert training_data_prepare.main(["--data_root", str(photo_tree / "data" / "00000"), "--output", str(index),
                                       "--force"]) == 0
    assert len(index.read_text(encoding="utf-8").splitlines()) == 2
    assert training_data_prepare.main(["--data_root", str(photo_tree / "data"), "--output", str(index)]) == 0
    assert index.read_bytes() == good


def test_prepare_follows_symlinked_shards_without_looping(photo_tree: Path) -> None:
    save(photo_tree / "disk2" / "shard" / "camera.png", skimage.data.camera(), "a cameraman")
    (photo_tree / "data" / "linked").symlink_to(photo_tree / "disk2" / "shard", target_is_directory=True)
    (photo_tree / "data" / "00000" / "loop").symlink_to(photo_tree / "data", target_is_directory=True)  # a cycle
    output = photo_tree / "training_data.json"
    assert training_data_prepare.main(["--data_root", str(photo_tree / "data"), "--output", str(output)]) == 0
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    # Paths go through the link, so the folder and its index still move together; each image appears once.
    linked = {"img_path": "data/linked/camera.png", "prompt": "a cameraman"}
    assert records == sorted([*EXPECTED, linked], key=lambda r: r["img_path"])
    assert FCDiffusionDataset(output, resolution=16)[records.index(linked)]["txt"] == "a cameraman"


def test_prepare_reads_gifs_and_drops_a_captions_byte_order_mark(tmp_path: Path) -> None:
    save(tmp_path / "data" / "coffee.gif", skimage.data.coffee())
    (tmp_path / "data" / "coffee.txt").write_text("a cup of coffee", encoding="utf-8-sig")
    output = tmp_path / "training_data.json"
    assert training_data_prepare.main(["--data_root", str(tmp_path / "data"), "--output", str(output)]) == 0
    assert json.loads(output.read_text(encoding="utf-8")) == {"img_path": "data/coffee.gif",
                                                              "prompt": "a cup of coffee"}
    image = FCDiffusionDataset(output, resolution=32)[0]["jpg"]
    assert image.shape == (32, 32, 3) and image.std() > 0.1


def test_high_bit_depth_greyscale_loads_like_its_8_bit_version(tmp_path: Path) -> None:
    camera = skimage.data.camera()
    camera16 = camera.astype(np.uint16) * 257  # 0..255 -> 0..65535
    Image.fromarray(camera).save(tmp_path / "camera8.png")
    Image.fromarray(camera16).save(tmp_path / "camera16.png")
    assert Image.open(tmp_path / "camera16.png").mode == "I;16"
    eight = load_image(tmp_path / "camera8.png", 64)
    assert eight.std() > 0.2  # a photo, so a white or clipped result could not pass below
    assert np.abs(load_image(tmp_path / "camera16.png", 64) - eight).max() <= 1 / 127.5

    # The other high-bit-depth modes PIL hands over: 32-bit ints on the 16-bit scale, big-endian 16-bit, floats
    # on [0, 1].
    for image in [Image.fromarray(camera16.astype(np.int32)), Image.fromarray(camera16.astype(">u2")),
                  Image.fromarray(camera.astype(np.float32) / 255)]:
        assert image.mode in ("I", "I;16B", "F")
        assert np.abs(prepare_image(image, 64) - eight).max() <= 1 / 127.5, image.mode

    # Colour modes still go through PIL's own conversion.
    astronaut = Image.fromarray(skimage.data.astronaut())
    rgb = prepare_image(astronaut, 64)
    for mode in ("RGBA", "CMYK", "LA"):
        expected = prepare_image(astronaut.convert(mode).convert("RGB"), 64)
        assert np.array_equal(prepare_image(astronaut.convert(mode), 64), expected), mode
    assert np.abs(prepare_image(astronaut.convert("RGBA"), 64) - rgb).max() == 0


def test_prepare_holds_out_a_fixed_disjoint_fraction_that_stays_put_as_the_crawl_grows(photo_tree: Path) -> None:
    output, held = photo_tree / "train.json", photo_tree / "train_val.json"
    args = ["--data_root", str(photo_tree / "data"), "--output", str(output), "--val_fraction", "0.5"]

    def split() -> tuple[list[str], list[str]]:
        assert training_data_prepare.main(args) == 0
        paths = [[json.loads(line)["img_path"] for line in f.read_text().splitlines()] for f in (output, held)]
        return paths[0], paths[1]

    train, val = split()
    assert sorted(train + val) == [r["img_path"] for r in EXPECTED] and not set(train) & set(val)
    assert train and val  # 0.5 of four paths: both sides get some (fixed by the hash, so this cannot flake)
    first = output.read_bytes(), held.read_bytes()
    assert split() and (output.read_bytes(), held.read_bytes()) == first  # the same split every time

    for i in range(12):  # the crawl grows: no pair changes sides
        save(photo_tree / "data" / "00002" / f"new{i}.png", skimage.data.camera()[::16, ::16], f"new photo {i}")
    grown_train, grown_val = split()
    assert set(train) <= set(grown_train) and set(val) <= set(grown_val) and not set(grown_train) & set(grown_val)
    assert 0 < len(grown_val) - len(val) < 12  # about half of the new pairs were held out
    assert training_data_prepare.main([*args[:4], "--val_fraction", "1.5"]) == 1
