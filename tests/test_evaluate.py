"""evaluate.py: pairs matched by name (mismatches reported), band fidelity and agreement, metrics.json, table, plot."""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import evaluate
from fcdiffusion.core.frequency import CONTROL_MODES
from fcdiffusion.core.paths import student_file
from fcdiffusion.evaluation.pairs import match_pairs, parse_result
from tests.helpers import PHOTOS, TINY_CLIP_ARCH, TINY_CLIP_CONFIG
from tests.test_inference import load_script


def test_result_names_parse_to_name_and_mode(tmp_path):
    assert parse_result(tmp_path / "cat_mini_pass.png") == ("cat", "mini_pass")
    assert parse_result(tmp_path / "x_png_high_pass.png") == ("x_png", "high_pass")
    assert parse_result(tmp_path / "cat_mini_pass_control.png") is None
    assert parse_result(tmp_path / "cat_grid.png") is None and parse_result(tmp_path / "low_pass.png") is None


@pytest.fixture(scope="module")
def translated(distilled, workdir, tmp_path_factory):
    """The student's results for the workdir photos at 1 and at 3 steps (the latter as the reference)."""
    root = tmp_path_factory.mktemp("evaluate")
    script = load_script()
    for steps, folder in (("1", "student"), ("3", "reference")):
        with contextlib.redirect_stderr(io.StringIO()):
            assert script.main(["--input_dir", str(workdir / "photos"), "--student", str(student_file(distilled)),
                                "--steps", steps, "--resolution", "128", "--out_dir", str(root / folder)]) == 0
    return root


def test_pairs_are_matched_by_name_and_every_mismatch_is_reported(translated, workdir, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(translated / "student", results)
    shutil.copy(results / "coffee_low_pass.png", results / "ghost_low_pass.png")  # a result with no source
    for mode in CONTROL_MODES:
        (results / f"chelsea_{mode}.png").unlink()  # a source with no result
    reference = tmp_path / "reference"
    shutil.copytree(translated / "reference", reference)
    (reference / "astronaut_high_pass.png").unlink()
    pairs, problems = match_pairs(results, workdir / "photos", reference=reference)
    assert sorted((p.name, p.mode) for p in pairs) == sorted(
        (n, m) for n in ("astronaut", "coffee") for m in CONTROL_MODES if (n, m) != ("astronaut", "high_pass"))
    assert any("ghost_low_pass.png: no source image named ghost" in p for p in problems)
    assert any("no astronaut_high_pass.png in the reference folder" in p for p in problems)
    assert any("no results for source" in p and "chelsea.png" in p for p in problems)
    assert all(p.prompt == PHOTOS[p.name] for p in pairs)


def test_evaluate_writes_metrics_table_and_plot(translated, workdir, distilled, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    args = ["--results", str(translated / "student"), "--input_dir", str(workdir / "photos"),
            "--reference", str(translated / "reference"), "--model", str(student_file(distilled)),
            "--metrics", "band", "band_retrieval", "teacher_agreement", "--out", str(out)]
    assert evaluate.main(args) == 0
    metrics = json.loads(out.read_text())
    for mode, figures in metrics["per_mode"].items():
        assert 0 <= figures["band_retrieval_latent"] <= 1 and figures["band_retrieval_chance"] == 1 / len(PHOTOS)
        assert figures["band_retrieval_n"] == len(PHOTOS)
        hits = [r["band_retrieval_latent"] for r in metrics["per_image"] if r["mode"] == mode]
        assert set(hits) <= {0.0, 1.0} and figures["band_retrieval_latent"] == pytest.approx(sum(hits) / len(hits))
        for metric in ("band_retrieval_latent", "band_error_latent", "teacher_latent_mse"):
            low, high = metrics["intervals"][mode][metric]
            assert low <= figures[metric] <= high
            assert min(r[metric] for r in metrics["per_image"] if r["mode"] == mode) <= low
    assert metrics["settings"]["bootstrap"] == {"method": "percentile bootstrap over images", "resamples": 10000,
                                                "set_level_resamples": 1000, "seed": 0, "level": 0.95}
    assert len(metrics["per_image"]) == len(PHOTOS) * len(CONTROL_MODES)
    record = metrics["per_image"][0]
    assert {"name", "mode", "band_error_latent", "band_freedom_latent", "band_error_pixel", "band_freedom_pixel",
            "teacher_latent_mse", "band_retrieval_latent"} == set(record)
    assert set(metrics["per_mode"]) == set(CONTROL_MODES)
    assert all(v["teacher_latent_mse"] > 0 and v["band_error_latent"] >= 0 for v in metrics["per_mode"].values())
    assert metrics["settings"]["model_modes"] == list(CONTROL_MODES)
    table = out.with_suffix(".md").read_text()
    assert "| mini_pass |" in table and " [" in table and "percentile bootstrap" in table
    assert Image.open(out.with_suffix(".png")).size[0] > 200
    # Sources as their own results: every band is retrieved.
    identity_results = make_self_results(workdir, tmp_path)
    assert evaluate.main(["--results", str(identity_results), "--input_dir", str(workdir / "photos"),
                          "--model", str(student_file(distilled)), "--metrics", "band_retrieval",
                          "--out", str(tmp_path / "identity.json")]) == 0
    identity = json.loads((tmp_path / "identity.json").read_text())["per_mode"]
    assert all(figures["band_retrieval_latent"] == 1 for figures in identity.values())
    # A result compared with itself agrees exactly.
    args[args.index("--reference") + 1] = str(translated / "student")
    assert evaluate.main([*args[:-1], str(tmp_path / "self.json")]) == 0
    assert all(r["teacher_latent_mse"] == 0 for r in json.loads((tmp_path / "self.json").read_text())["per_image"])


def make_self_results(workdir, tmp_path):
    """The source photos saved as results of every mode (128 px, as the translations are)."""
    from fcdiffusion.train.dataset import load_image

    folder = tmp_path / "identity"
    folder.mkdir()
    for name in PHOTOS:
        pixels = (load_image(workdir / "photos" / f"{name}.png", 128) + 1) * 127.5
        image = Image.fromarray(pixels.round().astype("uint8"))
        for mode in CONTROL_MODES:
            image.save(folder / f"{name}_{mode}.png")
    return folder


def test_metrics_needing_a_model_or_weights_say_so(translated, workdir, tmp_path, capsys):
    base = ["--results", str(translated / "student"), "--input_dir", str(workdir / "photos")]
    assert evaluate.main([*base, "--metrics", "band"]) == 1
    assert "need the model" in capsys.readouterr().err
    assert evaluate.main([*base, "--metrics", "fid"]) == 1
    assert "--fid_reference" in capsys.readouterr().err
    assert evaluate.main([*base, "--metrics", "fid", "--fid_reference", str(workdir / "photos"),
                          "--inception_weights", str(tmp_path / "inception-2015-12-05.pt")]) == 1
    error = capsys.readouterr().err
    assert str(tmp_path / "inception-2015-12-05.pt") in error and "nvlabs-fi-cdn.nvidia.com" in error
    assert evaluate.main([*base, "--results", str(tmp_path / "nowhere")]) == 1


def test_evaluate_runs_clip_score_and_dino_structure_from_local_files(translated, workdir, tmp_path, clip_file,
                                                                      dino_folder):
    out = tmp_path / "metrics.json"
    assert evaluate.main(["--results", str(translated / "student"), "--input_dir", str(workdir / "photos"),
                          "--metrics", "clip_score", "dino_structure", "--clip_arch", TINY_CLIP_ARCH,
                          "--clip_arch_config", str(TINY_CLIP_CONFIG), "--clip_weights", str(clip_file),
                          "--dino_weights", str(dino_folder), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert all(0 <= r["clip_score"] <= 100 and r["dino_structure"] > 0 for r in metrics["per_image"])
    assert metrics["settings"]["weight_files"] == {"clip_score": str(clip_file), "dino_structure": str(dino_folder)}
    assert metrics["settings"]["clip"] == {"arch": TINY_CLIP_ARCH, "weights": str(clip_file)}
    assert f"clip_score ({TINY_CLIP_ARCH})" in out.with_suffix(".md").read_text()


def test_translation_script_evaluates_its_results_in_one_flag(distilled, workdir, tmp_path, capsys):
    script = load_script()
    base = ["--input_dir", str(workdir / "photos"), "--student", str(student_file(distilled)), "--steps", "1",
            "--resolution", "128", "--mode", "low_pass"]
    out = tmp_path / "out"
    assert script.main([*base, "--out_dir", str(out), "--evaluate", "band"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["per_mode"]) == ["low_pass"] and len(metrics["per_image"]) == len(PHOTOS)
    assert (out / "metrics.png").is_file() and "band_error_latent" in capsys.readouterr().out
    # A missing weights file stops the run before any translation.
    assert script.main([*base, "--out_dir", str(tmp_path / "none"), "--evaluate", "dino_structure"]) == 1
    assert "models/dino-vitb8" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_evaluate_runs_lpips_fid_and_kid_from_local_files(translated, workdir, tmp_path, alexnet_file,
                                                          clean_inception_file):
    out = tmp_path / "metrics.json"
    assert evaluate.main(["--results", str(translated / "student"), "--input_dir", str(workdir / "photos"),
                          "--reference", str(translated / "reference"), "--metrics", "lpips", "fid",
                          "--lpips_weights", str(alexnet_file), "--inception_weights", str(clean_inception_file),
                          "--fid_reference", str(workdir / "photos"), "--bootstrap_set_resamples", "50",
                          "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert all(r["lpips_source"] > 0 and r["lpips_reference"] >= 0 for r in metrics["per_image"])
    for mode, figures in metrics["per_mode"].items():
        assert figures["fid"] > 0
        low, high = metrics["intervals"][mode]["fid"]
        assert low <= high and metrics["intervals"][mode]["kid"][0] <= metrics["intervals"][mode]["kid"][1]
    assert metrics["settings"]["weight_files"] == {"lpips": str(alexnet_file), "fid": str(clean_inception_file)}
    assert metrics["settings"]["fid"]["reference_images"] == len(PHOTOS)
    features = np.load(tmp_path / metrics["settings"]["fid"]["features"])
    assert features["reference"].shape == (len(PHOTOS), 2048)
    assert sorted(features["low_pass/names"]) == sorted(PHOTOS)


def test_compare_pairs_two_runs_by_image(translated, workdir, distilled, tmp_path, capsys):
    """Student (1 step) against its 3-step results: paired differences by name, intervals around them; a run
    against itself differs by exactly 0."""
    runs = {}
    for folder in ("student", "reference"):
        runs[folder] = tmp_path / f"{folder}.json"
        assert evaluate.main(["--results", str(translated / folder), "--input_dir", str(workdir / "photos"),
                              "--model", str(student_file(distilled)), "--metrics", "band",
                              "--out", str(runs[folder])]) == 0
    out = tmp_path / "compare.json"
    assert evaluate.main(["--compare", str(runs["student"]), str(runs["reference"]), "--out", str(out)]) == 0
    assert "B - A" in capsys.readouterr().out
    compared = json.loads(out.read_text())
    a, b = (json.loads(runs[k].read_text())["per_image"] for k in ("student", "reference"))
    for mode in CONTROL_MODES:
        expected = np.mean([rb["band_error_latent"] - ra["band_error_latent"] for ra, rb in zip(a, b)
                            if ra["mode"] == rb["mode"] == mode and ra["name"] == rb["name"]])
        assert compared["differences"][mode]["band_error_latent"] == pytest.approx(expected)
        low, high = compared["intervals"][mode]["band_error_latent"]
        assert low <= expected <= high
    assert compared["settings"]["matched_images"] == {mode: len(PHOTOS) for mode in CONTROL_MODES}
    assert Image.open(out.with_suffix(".png")).size[0] > 200
    assert evaluate.main(["--compare", str(runs["student"]), str(runs["student"]), "--out", str(out)]) == 0
    same = json.loads(out.read_text())
    assert all(v == 0 for figures in same["differences"].values() for v in figures.values())
    assert all(i == [0, 0] for figures in same["intervals"].values() for i in figures.values())
