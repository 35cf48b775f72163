"""PIE-Bench on a small folder in PIE-Bench's own layout (scikit-image photos, rectangle edit masks in its run-length
code, prompts with [bracketed] edits), each metric against an independent computation on the same weights:
scikit-image's PSNR / MSE / SSIM, torchmetrics' LPIPS (PIE-Bench's own implementation), open_clip's CLIP score,
and DINO keys recomputed from the hidden states."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import skimage.data
import torch
import torchvision
from PIL import Image
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

import evaluate
from fcdiffusion.core.weights import load_teacher
from fcdiffusion.evaluation.pie_bench import PieMetrics, decode_mask, read_mapping
from ldm.checkpoint import load_state_dict
from tests.helpers import TINY_CLIP_ARCH, TINY_CLIP_CONFIG, teacher_paths
from tests.test_eval_clip_dino import reference_dino_distance

SIZE = 64
# key -> (photo, editing type id, original prompt, editing prompt, edited rectangle (top, left, bottom, right))
ENTRIES = {
    "000000000000": ("astronaut", "0", "an astronaut [in white]", "an astronaut [in red]", (8, 8, 40, 40)),
    "111000000000": ("chelsea", "1", "a [cat] lying down", "a [dog] lying down", (20, 10, 60, 50)),
    "111000000001": ("coffee", "1", "a cup of [coffee]", "a cup of [tea]", (0, 0, 64, 64)),  # everything edited
    "911000000000": ("rocket", "9", "a [photo] of a rocket", "a [watercolor painting] of a rocket", (4, 30, 60, 62)),
    "911000000001": ("camera", "9", "a [photo] of a man", "a [sketch] of a man", (10, 10, 30, 30)),
}


def encode_mask(mask: np.ndarray) -> list[int]:
    """PIE-Bench's run-length code of a bool mask: (start, length) of each run of True over the row-major pixels."""
    flat = np.concatenate([[False], mask.flatten(), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    starts, ends = edges[::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


def rectangle(box: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[box[0]:box[2], box[1]:box[3]] = True
    return mask


def photo(name: str) -> np.ndarray:
    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    return np.asarray(image.resize((SIZE, SIZE), Image.BICUBIC))


@pytest.fixture(scope="module")
def pie(tmp_path_factory) -> Path:
    """`data/` as PIE-Bench ships it, and `results/<key>.png`: the source with its edit region recoloured and mild
    noise over the background (keys as PIE-Bench's, one folder per editing type)."""
    root = tmp_path_factory.mktemp("pie")
    mapping, rng = {}, np.random.default_rng(0)
    (root / "results").mkdir()
    for key, (name, type_id, original, editing, box) in ENTRIES.items():
        relative = f"{type_id}_type/{key}.jpg"
        (root / "data" / "annotation_images" / f"{type_id}_type").mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(name)).save(root / "data" / "annotation_images" / relative, quality=95)
        mapping[key] = {"image_path": relative, "original_prompt": original, "editing_prompt": editing,
                        "editing_instruction": f"make it {editing}", "editing_type_id": type_id,
                        "blended_word": f"{name} {name}", "mask": encode_mask(rectangle(box))}
        source = np.asarray(Image.open(root / "data" / "annotation_images" / relative)).astype(int)
        result = source + rng.integers(-6, 7, size=source.shape)
        result[rectangle(box)] = 255 - result[rectangle(box)]
        Image.fromarray(result.clip(0, 255).astype(np.uint8)).save(root / "results" / f"{key}.png")
    (root / "data" / "mapping_file.json").write_text(json.dumps(mapping))
    return root


def squeezenet_file(folder: Path) -> Path:
    torch.manual_seed(0)
    path = folder / "squeezenet1_1-b8a52dc0.pth"
    if not path.exists():
        torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
    return path


def test_masks_decode_as_pie_bench_encodes_them():
    box = rectangle((5, 7, 20, 30))
    decoded = decode_mask(encode_mask(box), SIZE, SIZE)
    expected = box.copy()
    expected[[0, -1], :] = expected[:, [0, -1]] = True  # PIE-Bench counts the border as edited
    np.testing.assert_array_equal(decoded, expected)
    # A run past the end is cut there; an odd-length code is not PIE-Bench's.
    assert decode_mask([SIZE * SIZE - 3, 50], SIZE, SIZE)[-1].sum() == SIZE
    with pytest.raises(ValueError, match="pairs"):
        decode_mask([1, 2, 3], SIZE, SIZE)


def test_mapping_reads_pie_benchs_layout(pie):
    entries = read_mapping(pie / "data")
    assert [e.key for e in entries] == list(ENTRIES)
    first = entries[0]
    assert first.editing_prompt == "an astronaut in red" and first.original_prompt == "an astronaut in white"
    assert first.image == pie / "data" / "annotation_images" / "0_type" / "000000000000.jpg"
    assert [e.editing_type for e in entries] == ["random", "change object", "change object", "change style",
                                                 "change style"]
    with pytest.raises(FileNotFoundError, match="mapping_file.json"):
        read_mapping(pie)


def test_each_metric_matches_its_oracle(pie, tmp_path, clip_file, dino_folder, monkeypatch):
    import torchmetrics.functional.image.lpips as tm_lpips
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    from ldm.modules.encoders.modules import register_open_clip_config

    register_open_clip_config(TINY_CLIP_ARCH, TINY_CLIP_CONFIG)
    squeeze = squeezenet_file(tmp_path)
    metrics = PieMetrics(TINY_CLIP_ARCH, clip_file, TINY_CLIP_CONFIG, dino_folder, squeeze)
    backbone = torchvision.models.squeezenet1_1(weights=None)
    backbone.load_state_dict(torch.load(squeeze))
    monkeypatch.setattr(tm_lpips, "_get_tv_model_features", lambda net, pretrained=False: backbone.features)
    lpips_oracle = LearnedPerceptualImagePatchSimilarity(net_type="squeeze")
    clip_model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP_ARCH, pretrained=None)
    clip_model.load_state_dict(load_state_dict(clip_file))
    clip_model.eval()
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_ARCH)

    def clip_oracle(image: np.ndarray, prompt: str) -> float:
        with torch.no_grad():
            a = clip_model.encode_image(preprocess(Image.fromarray(image))[None])
            b = clip_model.encode_text(tokenizer([prompt]))
        return 100 * max(float(torch.nn.functional.cosine_similarity(a, b)), 0)

    for entry in read_mapping(pie / "data")[:2]:
        source = np.asarray(Image.open(entry.image).convert("RGB"))
        result = np.asarray(Image.open(pie / "results" / f"{entry.key}.png"))
        edited = decode_mask(entry.mask, SIZE, SIZE)
        ours = metrics(source, result, edited, entry.editing_prompt)
        keep = (~edited)[..., None]
        a, b = source / 255 * keep, result / 255 * keep
        assert ours["psnr"] == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1), rel=1e-6)
        assert ours["mse"] == pytest.approx(1e4 * mean_squared_error(a, b), rel=1e-6)
        ssim = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=1, channel_axis=2)
        assert ours["ssim"] == pytest.approx(100 * ssim, rel=1e-9)
        signed = [torch.from_numpy(x).permute(2, 0, 1)[None].float() * 2 - 1 for x in (a, b)]
        assert ours["lpips"] == pytest.approx(1e3 * float(lpips_oracle(*signed)), rel=1e-4)
        assert ours["clip_whole"] == pytest.approx(clip_oracle(result, entry.editing_prompt), abs=1e-4)
        assert ours["clip_edited"] == pytest.approx(
            clip_oracle(result * edited[..., None].astype(np.uint8), entry.editing_prompt), abs=1e-4)
        as_255 = [torch.from_numpy(x).permute(2, 0, 1)[None].float() for x in (source, result)]  # PIE's DINO input
        expected = 1e3 * float(reference_dino_distance(dino_folder, *as_255)[0])
        assert ours["structure_distance"] == pytest.approx(expected, rel=1e-4)
        assert ours["structure_distance"] > 0 and ours["lpips"] > 0 and 0 < ours["ssim"] < 100
        assert 0 < ours["clip_edited"] != ours["clip_whole"] > 0


def test_pie_benchmark_reports_every_edit_type_and_overall(pie, tmp_path, clip_file, dino_folder):
    squeeze = squeezenet_file(tmp_path)
    (pie / "results" / "911000000001.png").rename(tmp_path / "moved.png")  # one result missing
    out = tmp_path / "pie.json"
    weights = ["--clip_arch", TINY_CLIP_ARCH, "--clip_arch_config", str(TINY_CLIP_CONFIG), "--clip_weights",
               str(clip_file), "--dino_weights", str(dino_folder), "--lpips_weights", str(squeeze)]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert evaluate.main(["--benchmark", "pie", "--data", str(pie / "data"), "--results", str(pie / "results"),
                              *weights, "--out", str(out)]) == 0
    (tmp_path / "moved.png").rename(pie / "results" / "911000000001.png")
    assert "skipping 911000000001" in stderr.getvalue()
    report = json.loads(out.read_text())
    records = report["per_image"]
    assert [r["name"] for r in records] == list(ENTRIES)[:4]
    full = next(r for r in records if r["name"] == "111000000001")  # all edited: no background to measure
    assert full["psnr"] is None and full["ssim"] is None and full["clip_edited"] is not None
    assert list(report["per_type"]) == ["random", "change object", "change style", "overall"]
    overall = report["per_type"]["overall"]
    for metric in ("structure_distance", "psnr", "lpips", "mse", "ssim", "clip_whole", "clip_edited"):
        defined = [r[metric] for r in records if r[metric] is not None]
        assert overall[metric] == pytest.approx(np.mean(defined))
        low, high = report["intervals"]["overall"][metric]
        assert min(defined) <= low <= overall[metric] <= high <= max(defined)
    assert report["per_type"]["change object"]["psnr"] == pytest.approx(records[1]["psnr"])
    assert report["settings"]["clip"] == {"arch": TINY_CLIP_ARCH, "weights": str(clip_file)}
    table = out.with_suffix(".md").read_text()
    assert "| edit type | Structure distance x10^3 | PSNR | LPIPS x10^3 | MSE x10^4 | SSIM x10^2 |" in table
    assert f"CLIP whole ({TINY_CLIP_ARCH})" in table and "| overall |" in table
    assert Image.open(out.with_suffix(".png")).size[0] > 500


def test_pie_benchmark_translates_with_a_model(pie, workdir, tmp_path, clip_file, dino_folder):
    """A teacher edits every image with its editing prompt (2 steps at 128 px), results back at the source's size,
    noise seed 7 + the image's position; then the same report."""
    from fcdiffusion.core.inference import Translator

    teacher = teacher_paths(workdir / "logs")["low_pass"]
    results = tmp_path / "edited"
    weights = ["--clip_arch", TINY_CLIP_ARCH, "--clip_arch_config", str(TINY_CLIP_CONFIG), "--clip_weights",
               str(clip_file), "--dino_weights", str(dino_folder), "--lpips_weights", str(squeezenet_file(tmp_path))]
    with contextlib.redirect_stderr(io.StringIO()):
        assert evaluate.main(["--benchmark", "pie", "--data", str(pie / "data"), "--model", str(teacher),
                              "--results", str(results), "--steps", "2", "--resolution", "128", "--seed", "7",
                              "--batch_size", "2", *weights]) == 0
    assert sorted(p.name for p in results.glob("[0-9]*.png")) == sorted(f"{k}.png" for k in ENTRIES)
    report = json.loads((results / "metrics.json").read_text())
    assert report["settings"]["translation"]["mode"] == "low_pass" and len(report["per_image"]) == len(ENTRIES)
    # The third image (its own seed 9, whatever its batch) as the pipeline translates it alone.
    entry = read_mapping(pie / "data")[2]
    source = Image.open(entry.image).convert("RGB")
    pixels = torch.from_numpy(np.asarray(source.resize((128, 128), Image.BICUBIC))).permute(2, 0, 1).float()
    image = Translator(load_teacher(teacher))(pixels[None] / 127.5 - 1, [entry.editing_prompt], seed=[9], steps=2,
                                              decode_control=False)["low_pass"].image[0]
    expected = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    expected = np.asarray(Image.fromarray(expected).resize((SIZE, SIZE), Image.BICUBIC)).astype(int)
    written = np.asarray(Image.open(results / f"{entry.key}.png")).astype(int)
    assert written.shape == (SIZE, SIZE, 3) and np.abs(written - expected).max() <= 1
    assert math.isfinite(report["per_type"]["overall"]["structure_distance"])
