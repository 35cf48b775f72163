"""A small quickstart (two training and two held-out photos, a few steps) runs end to end and leaves every artefact
where the README says; failures are named."""
import json
import re

import pytest
import torch
from PIL import Image

import quickstart
from fcdiffusion.core.frequency import CONTROL_MODES
from fcdiffusion.core.weights import recorded
from fcdiffusion.train.trajectory import TrajectoryPool
from ldm.checkpoint import load_checkpoint

PHOTOS = ["rocket", "moon"]
HELDOUT = ["astronaut", "coffee"]
STUDENTS = ("student_k1", "student_k2", "student_k4")


def assert_png(path, size=None):
    assert path.is_file(), path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and (size is None or image.size == size), (path, image.size)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart")
    out = root / "outputs"
    code = quickstart.main(["--root", str(root), "--out", str(out), "--photos", *PHOTOS, "--heldout", *HELDOUT,
                            "--autoencoder_steps", "2", "--tiny_vae_steps", "2", "--unet_steps", "2",
                            "--teacher_steps", "2", "--distill_steps", "2", "--teacher_sample_steps", "4",
                            "--trajectories", "8", "--no-benchmark_sd", "--benchmark_images", "1",
                            "--min_free_gb", "0.1", "--band_ablation"])
    return code, root, out


def test_small_quickstart_writes_every_artefact(small_run):
    code, root, out = small_run
    assert code == 0
    for path in ("models/v2-1_tiny.ckpt", "models/autoencoder_tiny.safetensors", "CLIP-ViT-H-14/open_clip_tiny.bin",
                 "models/tiny_vae_tiny/config.json", "models/tiny_vae_tiny/diffusion_pytorch_model.safetensors"):
        assert (root / path).is_file(), path
    data = root / "datasets" / "quickstart"
    assert sorted(p.stem for p in (data / "photos" / "00000").glob("*.png")) == sorted(PHOTOS)
    assert sorted(p.stem for p in (data / "heldout").glob("*.png")) == sorted(HELDOUT)  # never trained on
    assert all((data / "heldout" / f"{name}.txt").read_text().strip() for name in HELDOUT)
    for run in ("autoencoder_tiny", "sd21_tiny"):
        assert (out / "lightning_logs" / f"{run}_checkpoint" / "last.ckpt").is_file()
    for mode in CONTROL_MODES:
        assert (out / "lightning_logs" / f"fcdiffusion_{mode}_checkpoint" / "last.ckpt").is_file()
        for name in HELDOUT:
            for folder in ("teacher", *STUDENTS):
                assert_png(out / "inference" / folder / f"{name}_{mode}.png", (128, 128))
            assert_png(out / "inference" / "teacher" / f"{name}_{mode}_control.png", (128, 128))
    assert (out / "lightning_logs" / "fcdiffusion_distill_checkpoint" / "student.safetensors").is_file()
    for figure in ("grid.png", "autoencoder.png", "losses.png", "guidance.png"):
        assert_png(out / figure)
    for which in ("full", "tiny"):  # the held-out reconstructions of both decoders
        for name in HELDOUT:
            assert_png(out / "autoencoder" / which / f"{name}.png", (128, 128))
    with Image.open(out / "grid.png") as grid:  # source, control, teacher, 3 students; a row per photo and mode
        assert grid.width > 6 * 128 and grid.height > len(HELDOUT) * len(CONTROL_MODES) * 128


def test_small_quickstart_trains_the_decoders_it_says(small_run):
    """The report says the teachers train the UNet's decoder with their control nets and the student its own, and that
    the student learns the teachers' trajectories for 1, 2 and 4 steps at a range of guidance scales, the ablation on
    the same trajectories without band weights: each teacher's decoder moved away from the pretrained tiny UNet's
    (and its encoder did not), and the files record it all."""
    _, root, out = small_run
    key = "model.diffusion_model.output_blocks.0.0.in_layers.2.weight"
    frozen = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    base, _ = load_checkpoint(root / "models" / "v2-1_tiny.ckpt")
    for mode in CONTROL_MODES:
        teacher, metadata = load_checkpoint(out / "lightning_logs" / f"fcdiffusion_{mode}_checkpoint" / "last.ckpt")
        assert recorded(metadata, "config")["params"]["sd_locked"] is False
        assert not torch.equal(teacher[key], base[key]) and torch.equal(teacher[frozen], base[frozen])
    _, metadata = load_checkpoint(out / "lightning_logs" / "fcdiffusion_distill_checkpoint" / "student.safetensors")
    assert "output_blocks" in recorded(metadata, "config")["params"]["trainable"]
    distill = recorded(metadata, "distill")
    assert distill["objective"] == "trajectory" and distill["student_steps"] == [1, 2, 4]
    assert distill["teacher_steps"] == 4 and distill["guidance_range"] == [2.0, 12.0]
    assert any(weight > 1 for bands in distill["band_weights"].values() for weight in bands.values())
    _, ablation = load_checkpoint(out / "lightning_logs" / "band_ablation" / "fcdiffusion_distill_checkpoint"
                                  / "student.safetensors")
    ablated = recorded(ablation, "distill")
    assert ablated["trajectory_file"] == distill["trajectory_file"]  # trained on the same trajectories
    pool = TrajectoryPool.load(distill["trajectory_file"])  # solved before the first step: 2 photos x 4 modes
    assert len(pool) == 8 and all(pool.count(mode) == 2 for mode in CONTROL_MODES)
    assert all(weight == 1 for bands in ablated["band_weights"].values() for weight in bands.values())


def test_small_quickstart_tables_and_report(small_run):
    _, _, out = small_run
    figures = json.loads((out / "benchmark.json").read_text())
    speed = figures["speed"]["tiny"]
    assert all(speed[k] > 0 for k in ("teacher_4_cfg_s", "student_1_s", "student_2_s", "student_4_s"))
    assert set(figures["fidelity"]) == set(CONTROL_MODES)
    assert figures["fidelity_setup"]["student_steps"] == [1, 2, 4] and "ablation" in figures["fidelity_setup"]
    # The teachers' references are their saved inference results (one photo here), not solved a second time.
    assert figures["fidelity_setup"]["references"]["read"] == len(CONTROL_MODES)
    assert len(list((out / "inference" / "teacher").glob("*_latents.safetensors"))) == len(HELDOUT) * 4
    assert all(f"ablation_student_k{k}_mse" in f for f in figures["fidelity"].values() for k in (1, 2, 4))
    assert all(f["student_k4_mse"] >= 0 and f["teacher_k4_mse"] >= 0 for f in figures["fidelity"].values())
    assert 0 < figures["memory"]["distiller_params"] < figures["memory"]["five_full_models_params"]
    tables = (out / "tables.md").read_text()
    rows = [line for line in tables.splitlines() if line.startswith("| ") and "---" not in line]
    assert any(line.startswith("| tiny |") for line in rows)
    assert all(any(line.startswith(f"| {mode} |") for line in rows) for mode in CONTROL_MODES)
    report = (out / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", report)
    expected = {"grid.png", "guidance.png", "autoencoder.png", "losses.png", "benchmark.json", "tables.md",
                "evaluation/teacher.json",
                *(f"evaluation/{s}.json" for s in STUDENTS)}
    assert expected <= set(links)
    for who in STUDENTS:
        student = json.loads((out / "evaluation" / f"{who}.json").read_text())
        assert set(student["per_mode"]) == set(CONTROL_MODES)
        assert all({"band_error_latent", "teacher_latent_mse", "band_retrieval_latent"} <= set(v)
                   for v in student["per_mode"].values())
    for row in ("full VAE", r"tiny decoder \(of the full encoder's latents\)", "tiny encoder \\+ tiny decoder"):
        assert re.search(rf"\| {row} \| [\d.]+ \| [\d.]+ \| \*\*[\d.]+\*\* \| ([\d.]+|—) \| ([\d.]+|—) \| [\d.]+ \|",
                         report), row
    assert all(speed[f"student_{k}_tiny_vae_s"] > 0 for k in (1, 2, 4))
    assert speed["tiny_vae"]["tiny_vae"].endswith("tiny_vae_tiny")
    assert all(f"| {mode} |" in report for mode in CONTROL_MODES)  # the retrieval table
    # Retrieval with its interval for the teachers and every student, then N and chance.
    assert all(re.search(rf"\| {mode} \|( [\d.]+ \[[\d.]+, [\d.]+\] \|){{4}} 2 \| 0.50 \|", report)
               for mode in CONTROL_MODES)
    assert all((out / link).exists() for link in links), links


def test_quickstart_refuses_without_disk_space(tmp_path, capsys):
    assert quickstart.main(["--root", str(tmp_path), "--out", str(tmp_path / "o"), "--min_free_gb", "1e9"]) == 1
    assert "refused to start" in capsys.readouterr().err


def test_quickstart_names_the_step_that_failed(tmp_path, capsys):
    (tmp_path / "models").mkdir()
    (tmp_path / "CLIP-ViT-H-14").mkdir()
    (tmp_path / "CLIP-ViT-H-14" / "open_clip_tiny.bin").write_bytes(b"a truncated download")
    code = quickstart.main(["--root", str(tmp_path), "--out", str(tmp_path / "o"), "--photos", "rocket",
                            "--autoencoder_steps", "1", "--min_free_gb", "0.1"])
    captured = capsys.readouterr()
    assert code == 1
    assert "reusing" in captured.out
    assert "failed at step 6/17 (train the tiny UNet on its latents" in captured.err
    with pytest.raises(SystemExit):  # an unknown photo name is refused by the parser
        quickstart.main(["--heldout", "lena"])
    assert quickstart.main(["--root", str(tmp_path), "--out", str(tmp_path / "o"), "--photos", "coffee",
                            "--min_free_gb", "0.1"]) == 1
    assert "every photo is held out" in capsys.readouterr().err


def test_the_band_ablation_runs_only_when_asked(tmp_path):
    """The default quickstart distils one student; `--band_ablation` adds the second for the benchmark to compare."""
    parser = quickstart.build_parser()
    for flags, asked in (([], False), (["--band_ablation"], True)):
        steps = quickstart.build_steps(quickstart.Layout(tmp_path, tmp_path / "out"), parser.parse_args(flags))
        assert any("ablation" in name for name, _ in steps) is asked
