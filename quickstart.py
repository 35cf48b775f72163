"""The whole pipeline on an embedded tiny default, from nothing to pictures and tables (`make quickstart`).

Runs, in order, the same scripts a GPU user runs with the real weights, on tiny stand-ins that first learn from
scikit-image's photos (a few are held out: every picture and figure of the report comes from those):
  1. a tiny random OpenCLIP text tower      2. the photos with captions: training and held-out
  3. training_data_prepare.py
  4. train_sd.py: the tiny autoencoder (SD's AutoencoderKL), started as a resampler and trained on the photos;
     distill_tiny_vae.py: a tinier one of TAESD's architecture distilled from it (its row of the report)
  5. train_sd.py: the tiny UNet, text-to-image on its latents; with the autoencoder and text tower, this is the
     tiny SD checkpoint the FCDiffusion steps start from
  6. tool_add_control_sd21.py              7-10. fcdiffusion_train.py, one teacher per control mode (each also
      trains the UNet's decoder, which minutes of pretraining leave weak)
  11. fcdiffusion_distill.py: the student, for 1, 2 and 4 steps, on the teachers' 50-step guided trajectories
      (with --band_ablation also a second one without band weights, on the same trajectories)
  12-13. test_distillation.py on the held-out photos (teachers, 50 guided steps; the student at 1, 2 and 4 steps)
  14. evaluate.py (band fidelity and band retrieval of both, the student's agreement with its teachers)
  15. benchmarks/distillation_benchmark.py 16. outputs/quickstart/: grid.png, losses.png, report.md
Re-running reuses what exists (training resumes from its last checkpoint and stops at once when done);
`--restart` starts over.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fcdiffusion import cli
from fcdiffusion.core.errors import RunError
from fcdiffusion.core.frequency import CONTROL_MODES
from fcdiffusion.core.paths import student_file, teacher_checkpoint
from fcdiffusion.train.demo_data import CAPTIONS, HELDOUT

TINY_TEACHER_CONFIG = "configs/model_config_tiny.yaml"
TINY_DISTILL_CONFIG = "configs/distill_config_tiny.yaml"
TINY_SD_CONFIG = "configs/sd21_tiny.yaml"
TINY_AUTOENCODER_CONFIG = "configs/autoencoder_tiny.yaml"
TINY_VAE_CONFIG = "configs/tiny_vae_distill_tiny.yaml"
STUDENT_STEP_COUNTS = (1, 2, 4)
# The distillation's metrics every this many steps: handing its 15 metrics to Lightning costs 15 ms a step here.
DISTILL_LOG_EVERY = 10
PHOTO_SIDE = 512  # photos are stored at most this large: training and inference run at 128 px


class StepFailed(RunError):
    """A quickstart step failed, or the quickstart cannot start; the message says which and why."""


@dataclass
class Layout:
    """Every path the quickstart reads or writes: the models and data under `root` (the repository by default), the
    logs, pictures and tables under `out`."""

    root: Path
    out: Path
    sd: Path = field(init=False)
    clip: Path = field(init=False)
    init: Path = field(init=False)
    autoencoder: Path = field(init=False)
    tiny_vae: Path = field(init=False)  # the tiny autoencoder distilled from the tiny one (a diffusers folder)
    photos: Path = field(init=False)
    heldout: Path = field(init=False)
    data: Path = field(init=False)
    logdir: Path = field(init=False)
    trajectories: Path = field(init=False)  # the distillation's solved trajectories, the ablation's too
    sweep: Path = field(init=False)  # the benchmark's guidance sweep latents, which guidance.png decodes
    ablation_logdir: Path = field(init=False)

    def __post_init__(self) -> None:
        models, data = self.root / "models", self.root / "datasets" / "quickstart"
        self.sd, self.init = models / "v2-1_tiny.ckpt", models / "fcdiffusion_init_tiny.ckpt"
        self.autoencoder, self.tiny_vae = models / "autoencoder_tiny.safetensors", models / "tiny_vae_tiny"
        self.clip = self.root / "CLIP-ViT-H-14" / "open_clip_tiny.bin"
        self.photos, self.heldout, self.data = data / "photos", data / "heldout", data / "training_data.json"
        self.logdir = self.out / "lightning_logs"
        self.trajectories, self.ablation_logdir = self.logdir / "trajectories.pt", self.logdir / "band_ablation"
        self.sweep = self.out / "guidance_sweep.pt"

    def teacher(self, mode: str) -> Path:
        return teacher_checkpoint(self.logdir, mode)

    @property
    def student(self) -> Path:
        return student_file(self.logdir)

    def results(self, which: str) -> Path:
        """Translations of the held-out photos by `which`: teacher, or student_k<steps>."""
        return self.out / "inference" / which

    @property
    def clip_override(self) -> str:
        return f"model.params.cond_stage_config.params.version={self.clip}"


def run_script(args: Sequence[str]) -> None:
    """Run a repository script's `main` with these arguments, in this process and from the repository's folder
    (what `python <script> <args>` runs, without starting Python and importing torch again for each of the steps);
    raise on a non-zero exit status."""
    script, *rest = map(str, args)
    print(f"  $ python {script} {' '.join(rest)}", flush=True)
    root = Path(__file__).resolve().parent
    name = "quickstart_step_" + Path(script).stem
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, root / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    with contextlib.chdir(root):
        code = module.main(rest)
    gc.collect()
    if code:
        raise StepFailed(f"`python {script} {' '.join(rest)}` exited with status {code}")


def build_steps(layout: Layout, args: argparse.Namespace) -> list[tuple[str, Callable[[], None]]]:
    """The ordered (name, action) pairs of the pipeline."""

    def text_tower() -> None:
        if layout.clip.is_file():
            print(f"  reusing {layout.clip}")
            return
        from fcdiffusion.train.tiny_base import build_tiny_text_tower

        build_tiny_text_tower(layout.clip, TINY_SD_CONFIG)

    def photos() -> None:
        from fcdiffusion.train.demo_data import export_demo_dataset

        export_demo_dataset(layout.photos, names=training_photos(args), max_side=PHOTO_SIDE)
        export_demo_dataset(layout.heldout, names=args.heldout, folder="", max_side=PHOTO_SIDE)

    def init() -> None:
        if layout.init.is_file():
            print(f"  reusing {layout.init}")
            return
        run_script(["tool_add_control_sd21.py", layout.sd, layout.init, "--config", TINY_TEACHER_CONFIG])

    def teacher(mode: str) -> Callable[[], None]:
        # --sd_locked false: each teacher trains the UNet's decoder with its control net (FCDiffusion's option for
        # a base that does not know the task yet); a tiny UNet pretrained for minutes needs it, SD 2.1 does not.
        # Its own sampling steps (its image log's, a script's default) are the quickstart's --teacher_sample_steps.
        return lambda: run_script([
            "fcdiffusion_train.py", "--config", TINY_TEACHER_CONFIG, "--control_mode", mode,
            "--resume_path", layout.init, "--data", layout.data, "--logdir", layout.logdir,
            "--max_steps", args.teacher_steps, "--learning_rate", args.teacher_lr, "--sd_locked", "false",
            "--checkpoint_every", args.teacher_steps, "--log_images_every", args.teacher_steps, layout.clip_override,
            f"model.params.ddim_steps={args.teacher_sample_steps}"])

    steps: list[tuple[str, Callable[[], None]]] = [
        ("build the tiny text tower", text_tower),
        ("export scikit-image photos with captions (training and held-out)", photos),
        ("index the training data (training_data_prepare.py)",
         lambda: run_script(["training_data_prepare.py", "--data_root", layout.photos, "--output", layout.data])),
        ("train the tiny autoencoder (train_sd.py)", lambda: run_script([
            "train_sd.py", "--config", TINY_AUTOENCODER_CONFIG, "--data", layout.data, "--logdir", layout.logdir,
            "--max_steps", args.autoencoder_steps, "--checkpoint_every", args.autoencoder_steps,
            "--log_images_every", args.autoencoder_steps, "--export", layout.autoencoder])),
        ("distill a tiny autoencoder of TAESD's architecture from it (distill_tiny_vae.py)", lambda: run_script([
            "distill_tiny_vae.py", "--config", TINY_VAE_CONFIG, "--vae", layout.autoencoder, "--data", layout.data,
            "--logdir", layout.logdir, "--max_steps", args.tiny_vae_steps, "--checkpoint_every", args.tiny_vae_steps,
            "--log_images_every", args.tiny_vae_steps, "--export", layout.tiny_vae])),
        ("train the tiny UNet on its latents (train_sd.py)", lambda: run_script([
            "train_sd.py", "--config", TINY_SD_CONFIG, "--autoencoder", layout.autoencoder, "--data", layout.data,
            "--logdir", layout.logdir, "--max_steps", args.unet_steps, "--checkpoint_every", args.unet_steps,
            "--log_images_every", args.unet_steps, "--export", layout.sd, layout.clip_override])),
        ("add the control net (tool_add_control_sd21.py)", init),
    ]
    steps += [(f"train the {mode} teacher (fcdiffusion_train.py)", teacher(mode)) for mode in CONTROL_MODES]
    steps.append(("distill one student from the four teachers (fcdiffusion_distill.py)", lambda: distill(layout, args)))
    if args.band_ablation:
        steps.append(("distill the band-weight ablation on the same trajectories (fcdiffusion_distill.py)",
                      lambda: distill(layout, args, ablation=True)))
    steps += [
        (f"run the teachers on the held-out photos, {args.teacher_sample_steps} guided steps (test_distillation.py)",
         lambda: infer(layout, args, "teacher")),
        (f"run the student on the held-out photos at {', '.join(map(str, STUDENT_STEP_COUNTS))} steps "
         "(test_distillation.py)", lambda: infer(layout, args, "student")),
        ("evaluate band fidelity, band retrieval and teacher agreement (evaluate.py)", lambda: evaluate(layout)),
        ("benchmark speed, fidelity and memory", lambda: benchmark(layout, args)),
        ("write grid.png, losses.png and report.md", lambda: report(layout, args)),
    ]
    return steps


def training_photos(args: argparse.Namespace) -> list[str]:
    """The photos the models train on: those asked for (default: all), never a held-out one."""
    names = [n for n in (args.photos or CAPTIONS) if n not in args.heldout]
    if not names:
        raise StepFailed("every photo is held out; nothing is left to train on")
    return names


def distill(layout: Layout, args: argparse.Namespace, ablation: bool = False) -> None:
    """The guidance-conditioned student, trained for 1, 2 and 4 steps on the teachers' 50-step guided trajectories
    (the config's `objective: trajectory`), all solved before its first step in one batched solve (`--trajectories`),
    with the size of each step as an input (the config's `student.step_embedding`). The teachers trained
    their UNet decoders (`model.params.sd_locked=false` builds them so, each keeping its own), so the student trains
    its decoder too; it starts from the high_pass teacher: the finest band is the one a few-step student of a tiny
    model learns last. It exports the EMA of its weights (decay 0.99): on 64 trajectories the average lowered every
    4-step error, by 7-29% (docs/measurements.md). The run writes its solved trajectories to `trajectories.pt`; the
    ablation (`ablation`) trains on exactly those, every band weight 1."""
    teachers = [arg for mode in CONTROL_MODES for arg in (f"--teacher_{mode}", layout.teacher(mode))]
    unweighted = [f"distill.band_weights.{mode}.{band}=1.0" for mode, bands in tiny_band_weights().items()
                  for band in bands] if ablation else []
    run_script(["fcdiffusion_distill.py", "--config", TINY_DISTILL_CONFIG, *teachers,
                "--student_init", layout.teacher("high_pass"), "--student_steps", *STUDENT_STEP_COUNTS,
                "--guidance_range", *args.guidance_range, "--teacher_steps", args.teacher_sample_steps,
                "--trajectory_prefill", args.trajectories, "--trajectory_refresh", args.distill_steps,
                "--trajectory_prefill_batch", -(-args.trajectories // len(CONTROL_MODES)),
                "--trajectory_file", layout.trajectories,
                "--trainable", "control_net", "output_blocks", "--learning_rate", args.distill_lr, "--ema_decay", 0.99,
                "--data", layout.data, "--logdir", layout.ablation_logdir if ablation else layout.logdir,
                "--max_steps", args.distill_steps, "--batch_size", args.distill_batch,
                "--checkpoint_every", args.distill_steps,
                "--log_images_every", 0 if ablation else args.distill_steps,
                layout.clip_override, "model.params.sd_locked=false", f"train.log_every={DISTILL_LOG_EVERY}",
                *unweighted])


def tiny_band_weights() -> dict[str, dict[str, float]]:
    """The tiny distillation config's band weights (mode -> band -> weight)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(TINY_DISTILL_CONFIG).distill.band_weights)


def infer(layout: Layout, args: argparse.Namespace, which: str) -> None:
    """Weight files describe themselves: the student serves every mode it learned, each teacher its own mode. Both
    use the benchmark's fidelity seed, so the teachers' saved latents are its references (solved once, not twice)."""
    from fcdiffusion.apps.benchmark import SEED

    common = ["--input_dir", layout.heldout, "--resolution", 128, "--seed", SEED]
    if which == "student":
        for k in STUDENT_STEP_COUNTS:
            run_script(["test_distillation.py", *common, "--student", layout.student, "--steps", k,
                        "--out_dir", layout.results(f"student_k{k}")])
        return
    for mode in CONTROL_MODES:
        run_script(["test_distillation.py", *common, "--teacher", layout.teacher(mode),
                    "--steps", args.teacher_sample_steps, "--save_latents", "--out_dir", layout.results("teacher")])


def evaluate(layout: Layout) -> None:
    """The metrics that mean something for tiny models on four photos: band fidelity and band retrieval of the
    teachers and of the student at each step count, and the student's agreement with its teachers. Every model
    here shares one VAE and one set of band edges, so the student file serves for all."""
    common = ["evaluate.py", "--input_dir", layout.heldout, "--model", layout.student]
    out = layout.out / "evaluation"
    run_script([*common, "--results", layout.results("teacher"), "--metrics", "band", "band_retrieval",
                "--out", out / "teacher.json"])
    for k in STUDENT_STEP_COUNTS:
        run_script([*common, "--results", layout.results(f"student_k{k}"), "--reference", layout.results("teacher"),
                    "--metrics", "band", "band_retrieval", "teacher_agreement", "--out", out / f"student_k{k}.json"])


def benchmark(layout: Layout, args: argparse.Namespace) -> None:
    run_script(["benchmarks/distillation_benchmark.py", "--teachers_dir", layout.logdir, "--student", layout.student,
                "--sd_resolution", args.sd_resolution, "--sd" if args.benchmark_sd else "--no-sd",
                "--teacher_steps", args.teacher_sample_steps, "--images", args.benchmark_images, "--sd_images", 1,
                "--heldout", layout.heldout, "--references", layout.results("teacher"), "--tiny_vae", layout.tiny_vae,
                *(["--ablation_student", student_file(layout.ablation_logdir)] if args.band_ablation else []),
                "--guidance_images", 1, "--sweep_latents", layout.sweep,
                "--sd_teacher_timing_steps",
                *args.sd_teacher_timing_steps, "--out", layout.out / "benchmark.json"])


def guidance_figure(layout: Layout) -> tuple[str, list[float]]:
    """guidance.png: for the benchmark's guidance photo, a row per mode: the 4-step student and the teacher's guided
    result at the ends of the student's guidance range and at its default w (same noise), decoded from the latents
    the benchmark measured them with (`--sweep_latents`: no solve again). Returns the photo's name and the scales."""
    import torch

    from fcdiffusion.core.images import labelled_grid, save_png
    from fcdiffusion.core.inference import Translator
    from fcdiffusion.core.weights import load_student
    from fcdiffusion.train.dataset import load_image

    sweep = torch.load(layout.sweep, weights_only=True)
    decode = Translator(load_student(layout.student).eval()).decode  # every model here shares the student's VAE
    image = torch.from_numpy(load_image(layout.heldout / sweep["image"], 128)).permute(2, 0, 1)
    columns: dict[str, list] = {"source": [image] * len(CONTROL_MODES)}
    teacher = f"teacher_{sweep['teacher_steps']}"
    with torch.no_grad():
        for mode in CONTROL_MODES:
            for w in sweep["scales"]:
                latents = sweep["latents"][f"{mode} w{w:g}"]
                for label, key in ((f"student 4, w={w:g}", "student_k4"),
                                   (f"teacher {sweep['teacher_steps']}, w={w:g}", teacher)):
                    columns.setdefault(label, []).append(decode(latents[key])[0].clamp(-1, 1))
    save_png(labelled_grid({k: torch.stack(v) for k, v in columns.items()},
                           row_labels=[mode.replace("_pass", "") for mode in CONTROL_MODES]),
             layout.out / "guidance.png")
    return Path(sweep["image"]).stem, sweep["scales"]


def autoencoder_figure(layout: Layout, names: Sequence[str]) -> str:
    """autoencoder.png (held-out photos over the full and the tiny decoder's reconstructions at 128 px), each
    reconstruction under autoencoder/full/ and autoencoder/tiny/, and the Markdown table of their PSNR and speed."""
    import torch
    from omegaconf import OmegaConf

    from fcdiffusion.apps.benchmark import timed
    from fcdiffusion.core.images import labelled_grid, save_image, save_png
    from fcdiffusion.train.dataset import load_image
    from ldm.models.tiny_autoencoder import load_tiny_autoencoder
    from ldm.modules.losses import psnr
    from ldm.util import instantiate_from_config, load_config

    config = OmegaConf.to_container(load_config(TINY_AUTOENCODER_CONFIG).model, resolve=True)
    config["params"]["ckpt_path"] = str(layout.autoencoder)
    vae, tiny = instantiate_from_config(config).eval(), load_tiny_autoencoder(layout.tiny_vae)
    scale = json.loads(load_metadata(layout.tiny_vae)["fcdiffusion.tiny_vae"])["scale_factor"]
    sources = torch.from_numpy(np.stack([load_image(layout.heldout / f"{name}.png", 128) for name in names]))
    sources = sources.permute(0, 3, 1, 2)
    cpu = torch.device("cpu")
    with torch.no_grad():
        mean = vae.encode(sources).mode()
        full, tiny_decoded = vae.decode(mean).clamp(-1, 1), tiny.decode(scale * mean).clamp(-1, 1)
        both = tiny.decode(tiny.encode(sources)).clamp(-1, 1)
        seconds = {"full": (min(timed(lambda: vae.encode(sources), cpu, 3)),
                            min(timed(lambda: vae.decode(mean), cpu, 3))),
                   "tiny": (min(timed(lambda: tiny.encode(sources), cpu, 3)),
                            min(timed(lambda: tiny.decode(scale * mean), cpu, 3)))}
    for which, images in (("full", full), ("tiny", tiny_decoded)):
        for name, image in zip(names, images):
            save_image(image, layout.out / "autoencoder" / which / f"{name}.png")
    save_png(labelled_grid({"held-out photo": sources, "full decoder": full, "tiny decoder": tiny_decoded},
                           row_labels=names), layout.out / "autoencoder.png")
    n = len(names)
    table = ["| reconstruction | " + " | ".join(names) + " | mean | PSNR vs full VAE | encode ms/image | decode "
             "ms/image |", "| --- |" + " --- |" * (n + 4)]
    rows = {"full VAE": (full, "—", seconds["full"][0], seconds["full"][1]),
            "tiny decoder (of the full encoder's latents)": (tiny_decoded, psnr(tiny_decoded, full).mean(), None,
                                                             seconds["tiny"][1]),
            "tiny encoder + tiny decoder": (both, psnr(both, full).mean(), *seconds["tiny"])}
    for label, (images, versus, encode, decode) in rows.items():
        scores = psnr(images, sources).tolist()
        versus = versus if isinstance(versus, str) else f"{float(versus):.2f}"
        encode = "—" if encode is None else f"{1000 * encode / n:.1f}"
        table.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in scores) + f" | **{np.mean(scores):.2f}** | "
                     f"{versus} | {encode} | {1000 * decode / n:.1f} |")
    return "\n".join(table) + "\n"


def load_metadata(folder: Path) -> dict[str, str]:
    """The metadata of a diffusers folder's safetensors weights."""
    from ldm.checkpoint import load_checkpoint

    return load_checkpoint(folder / "diffusion_pytorch_model.safetensors")[1]


def retrieval_table(layout: Layout) -> str:
    """Per mode, the band-retrieval accuracy (evaluate.py's band_retrieval_latent) of the teachers and students with
    its 95% bootstrap interval over the photos, N (the photos) and chance (1 / N)."""
    who = ["teacher", *(f"student_k{k}" for k in STUDENT_STEP_COUNTS)]
    runs = {w: json.loads((layout.out / "evaluation" / f"{w}.json").read_text()) for w in who}
    lines = ["| mode | " + " | ".join(w.replace("_k", " k=") for w in who) + " | N | chance |",
             "| --- |" + " --- |" * (len(who) + 2)]
    for mode in CONTROL_MODES:
        cells = [f"{runs[w]['per_mode'][mode]['band_retrieval_latent']:.2f} "
                 "[{:.2f}, {:.2f}]".format(*runs[w]["intervals"][mode]["band_retrieval_latent"]) for w in who]
        figures = runs["teacher"]["per_mode"][mode]
        lines.append(f"| {mode} | " + " | ".join(cells)
                     + f" | {figures['band_retrieval_n']:.0f} | {figures['band_retrieval_chance']:.2f} |")
    return "\n".join(lines) + "\n"


def report(layout: Layout, args: argparse.Namespace) -> None:
    """grid.png (a row per held-out photo and mode: source, control, teacher, student at 1, 2 and 4 steps),
    autoencoder.png, losses.png (every training run), tables.md and report.md."""
    import torch

    from fcdiffusion.apps.benchmark import format_tables
    from fcdiffusion.core.images import labelled_grid, save_png
    from fcdiffusion.train.dataset import load_image
    from fcdiffusion.train.loss_curves import plot_losses, read_losses
    from ldm.util import atomic_write_text

    names = sorted(p.stem for p in layout.heldout.glob("*.png"))
    if not names:
        raise StepFailed(f"no held-out photos in {layout.heldout}")

    def read(path: Path) -> torch.Tensor:
        if not path.is_file():
            raise StepFailed(f"missing result {path}")
        return torch.from_numpy(load_image(path, 128)).permute(2, 0, 1)

    student = {f"student k={k}": layout.results(f"student_k{k}") for k in STUDENT_STEP_COUNTS}
    columns: dict[str, list] = {}
    for name in names:
        for mode in CONTROL_MODES:
            row = {"source": layout.heldout / f"{name}.png",
                   "control": layout.results("teacher") / f"{name}_{mode}_control.png",
                   f"teacher {args.teacher_sample_steps}": layout.results("teacher") / f"{name}_{mode}.png",
                   **{label: folder / f"{name}_{mode}.png" for label, folder in student.items()}}
            for label, path in row.items():
                columns.setdefault(label, []).append(read(path))
    rows = [f"{name} {mode.replace('_pass', '')}" for name in names for mode in CONTROL_MODES]
    save_png(labelled_grid({k: torch.stack(v) for k, v in columns.items()}, row_labels=rows), layout.out / "grid.png")
    psnr_table = autoencoder_figure(layout, names)
    guidance_photo, scales = guidance_figure(layout)
    runs = {"autoencoder": "autoencoder_tiny", "tiny autoencoder": "tiny_vae_distill_tiny", "UNet": "sd21_tiny",
            **{f"{mode} teacher": f"fcdiffusion_{mode}" for mode in CONTROL_MODES}, "distiller": "fcdiffusion_distill"}
    plot_losses({label: read_losses(layout.logdir / run) for label, run in runs.items()}, layout.out / "losses.png")
    results = json.loads((layout.out / "benchmark.json").read_text())
    tables = format_tables(results, args.teacher_sample_steps)
    atomic_write_text(layout.out / "tables.md", tables)
    evaluation = {who: (layout.out / "evaluation" / f"{who}.md").read_text()
                  for who in ("teacher", *(f"student_k{k}" for k in STUDENT_STEP_COUNTS))}
    atomic_write_text(layout.out / "report.md", REPORT.format(
        train_photos=len(training_photos(args)), heldout=", ".join(names), autoencoder_steps=args.autoencoder_steps,
        unet_steps=args.unet_steps, teacher_steps=args.teacher_steps, distill_steps=args.distill_steps,
        distill_batch=args.distill_batch, distill_log_every=DISTILL_LOG_EVERY, tiny_vae_steps=args.tiny_vae_steps,
        guidance_range=" to ".join(f"{w:g}" for w in args.guidance_range),
        guidance_photo=guidance_photo, guidance_scales=", ".join(f"{w:g}" for w in scales),
        sample_steps=args.teacher_sample_steps, tables=tables,
        ablation=" A second student was distilled the same way on the same trajectories without band weights (the "
                 "ablation in the figures)." if args.band_ablation else "",
        psnr_table=psnr_table, retrieval=retrieval_table(layout), teacher_metrics=evaluation["teacher"],
        student_metrics="\n".join(f"Student, {k} step{'s' * (k > 1)}, [evaluation/student_k{k}.json]"
                                  f"(evaluation/student_k{k}.json):\n\n" + evaluation[f"student_k{k}"]
                                  for k in STUDENT_STEP_COUNTS)))


REPORT = """# Quickstart report

The whole FCDiffusion pipeline ran on the embedded tiny default. Its stand-ins for SD 2.1 learnt from
{train_photos} scikit-image photos: the autoencoder for {autoencoder_steps} steps (it starts as a resampler, see
below), the UNet text-to-image for {unet_steps} steps. Then four teachers trained for {teacher_steps} steps each,
each training the UNet's decoder along with its control net (`--sd_locked false`, FCDiffusion's option: a UNet
pretrained for minutes is too weak a base to keep frozen), and one student (its control net and decoder, started
from the high_pass teacher) was distilled from them for {distill_steps} steps (a batch of {distill_batch} per mode):
for 1, 2 and 4 steps at once, on the teachers' {sample_steps}-step guided trajectories, at guidance scales
{guidance_range} (an input of the student, so the demo's slider acts on it).{ablation} Every picture and figure
below comes from photos none of these models saw: {heldout} (`datasets/quickstart/heldout/`).

## Pictures

[grid.png](grid.png): a row per held-out photo and control mode: the source, the decoded control signal, the
teacher's {sample_steps}-step guided result and the student's results at 1, 2 and 4 steps (same noise).
Per-image outputs: [inference/](inference/) (`teacher/`, `student_k1/`, `student_k2/`, `student_k4/`);
training grids: `lightning_logs/*/image_log/`.

![grid](grid.png)

## The guidance scale acts

[guidance.png](guidance.png): {guidance_photo}, a row per mode: the 4-step student and the teachers'
{sample_steps}-step guided result at w = {guidance_scales} (same noise): the very latents the fidelity table at each w
below measures, decoded. The student takes w as an input and samples in 4 network evaluations whatever w; the
teacher needs 2 per step. The demo's guidance slider drives the same input.

![guidance](guidance.png)

## The autoencoder

Reconstructions of the held-out photos at 128 px by the full decoder and by the tiny decoder distilled from it
([autoencoder.png](autoencoder.png); each under [autoencoder/full/](autoencoder/full/) and
[autoencoder/tiny/](autoencoder/tiny/)), PSNR in dB against the photo and against the full VAE's reconstruction, and
milliseconds per image on this machine (a batch of the held-out photos, the fastest of 3):

![autoencoder](autoencoder.png)

{psnr_table}
The tiny autoencoder is SD's `AutoencoderKL` with fewer channels and 4x (not 8x) downsampling. Trained from
random weights it needs hours to reconstruct recognisably; here it starts as 4x4 average pooling + bilinear
upsampling built from its own layers (`fcdiffusion/train/resampler_init.py`) and training refines that. The tiny
decoder is TAESD's architecture (2 stages for this 4x VAE, 16 channels) distilled from it for {tiny_vae_steps} steps
(`distill_tiny_vae.py`: it starts as the linear resampler closest to the VAE; its encoder regresses the VAE's
scaled latents, its decoder the VAE's images and the photos; no LPIPS term, whose backbone weights are not here).
The benchmark below times the student with it too; at the SD architecture with TAESD's own architecture (random
weights), where it replaces a far larger VAE.

## Training losses

Per logged step (every step; every {distill_log_every}th for the distillation), and a 10-point moving average, from
the runs' CSV logs ([losses.png](losses.png)):

![losses](losses.png)

## Does each mode keep its band?

Band retrieval (`evaluate.py --metrics band_retrieval`): the share of outputs whose controlled DCT band (in the
latent) is more similar (cosine) to their own source's than to any other held-out photo's, with its 95% bootstrap
interval over the N photos. Chance is 1 / N.

{retrieval}
## Figures

From [benchmark.json](benchmark.json) (also in [tables.md](tables.md)):

{tables}
## Evaluation

`evaluate.py` on the results above (definitions: `fcdiffusion/evaluation/`). band_error: how far the result's
controlled DCT band is from the source's (0: kept exactly); band_freedom: how much the other bands changed;
in the VAE's latent space (what the control net sees) and in pixels. teacher_latent_mse: the student's result
against the teacher's, re-encoded. CLIP score, DINO structure, LPIPS and FID/KID are left out: the text tower
is random and their networks' weights are not here, so their numbers would mean nothing (the tests check their
plumbing on such networks).

Teachers ({sample_steps} guided steps), [evaluation/teacher.json](evaluation/teacher.json):

{teacher_metrics}
{student_metrics}
## What a tiny model trained for minutes can and cannot show

It shows the pipeline doing its job end to end on photos it never saw: the trained autoencoder, the decoded
control signal of each mode, each teacher carrying its source's band into its result (the retrieval table), the
student at 1-4 steps following its 50-step guided teachers, and how much faster it is. The pictures stay noisy: a
UNet trained on {train_photos} photos for a few hundred steps leaves speckle in every result, and a band_error above 1
means that speckle outweighs the band that was kept. Retrieval compares the direction of a result's band with each
source's (cosine, whatever the energy), so speckle that swamps a weak band is what makes a photo hard to retrieve.
With N photos an interval is wide (one photo moves the accuracy by 1 / N). The results come from one noise seed per
photo: with other seeds, teachers and student miss such a photo now and then
(the README gives the figures over six seeds). It cannot show what a prompt does (the text tower is random): style
or content transfer needs the real weights.
"""


def check_disk(path: Path, need_gb: float) -> None:
    """Refuse to start without `need_gb` GiB free where the outputs go."""
    path.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(path).free / 2**30
    if free_gb < need_gb:
        raise StepFailed(f"quickstart refused to start: only {free_gb:.1f} GiB free at {path}, it needs "
                         f"{need_gb:.1f} GiB")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--root", default=".", help="where models/, CLIP-ViT-H-14/ and datasets/ are")
    parser.add_argument("--out", default="outputs/quickstart", help="where logs, pictures and tables go")
    parser.add_argument("--restart", action="store_true", help="delete what an earlier run built, start over")
    parser.add_argument("--photos", nargs="*", help="scikit-image photos to train on (default: all but the held-out)")
    parser.add_argument("--heldout", nargs="+", default=list(HELDOUT), choices=list(CAPTIONS),
                        help="scikit-image photos never trained on; the report shows only them")
    parser.add_argument("--autoencoder_steps", type=int, default=100,
                        help="training steps of the autoencoder (it starts as a resampler; training refines it)")
    parser.add_argument("--tiny_vae_steps", type=int, default=100,
                        help="distillation steps of the tiny autoencoder (TAESD's architecture)")
    parser.add_argument("--sd_teacher_timing_steps", type=int, nargs=2, default=[1, 4], metavar=("K1", "K2"),
                        help="the SD-architecture teacher is timed at these step counts and its 50-step time "
                             "extrapolated (benchmark.json says so)")
    parser.add_argument("--unet_steps", type=int, default=300, help="text-to-image training steps of the UNet")
    parser.add_argument("--teacher_steps", type=int, default=200, help="training steps per teacher")
    parser.add_argument("--teacher_lr", type=float, default=1e-3,
                        help="the teachers' learning rate: 200 steps need more than the config's 1e-4")
    parser.add_argument("--distill_steps", type=int, default=1000,
                        help="distillation steps (its errors still fall from 500 to 1000: docs/measurements.md)")
    parser.add_argument("--distill_batch", type=int, default=1,
                        help="trajectories per mode in a distillation step (its batch size): 1000 steps of 1 cost "
                             "about what 500 of 2 do and got nearer the teachers (docs/measurements.md)")
    parser.add_argument("--distill_lr", type=float, default=1e-3,
                        help="the student's learning rate: a few hundred steps need more than the config's 1e-4 (at "
                             "250 steps 1e-3 left the 4-step errors 6-46%% below 3e-4's, docs/measurements.md)")
    parser.add_argument("--guidance_range", type=float, nargs=2, default=[2.0, 12.0], metavar=("LO", "HI"),
                        help="the guidance scales the student learns (the teachers use 9)")
    parser.add_argument("--trajectories", type=int, default=64,
                        help="teacher trajectories the distillation solves before its first step (a quarter as "
                             "many photos x 4 modes, in one batched solve) and then trains on")
    parser.add_argument("--teacher_sample_steps", type=int, default=50, help="the teachers' DDIM steps")
    parser.add_argument("--band_ablation", action="store_true",
                        help="also distil a student without band weights on the same trajectories and compare the two "
                             "per band in the benchmark (docs/measurements.md; about 4 minutes more here)")
    parser.add_argument("--benchmark_sd", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the SD 2.1-base architecture (random weights, reduced resolution)")
    parser.add_argument("--sd_resolution", type=int, default=128, help="image size for the SD-architecture timing")
    parser.add_argument("--benchmark_images", type=int, default=4, help="photos per benchmark measurement")
    parser.add_argument("--min_free_gb", type=float, default=2.0, help="refuse to start with less free disk")
    return parser


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """Check the disk, then run every step in order; a failing step stops the quickstart, naming it."""
    layout = Layout(Path(args.root), Path(args.out))
    if args.restart:
        for path in (layout.out, layout.sd, layout.clip, layout.init, layout.autoencoder, layout.tiny_vae,
                     layout.photos.parent):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    steps = build_steps(layout, args)
    start = time.time()
    check_disk(layout.out, args.min_free_gb)
    for number, (name, action) in enumerate(steps, 1):
        print(f"\n[{number}/{len(steps)}] {name}  ({time.time() - start:.0f} s so far)", flush=True)
        try:
            action()
        except Exception as error:  # any failure: say which step, keep the traceback short
            detail = str(error) if isinstance(error, StepFailed) else f"{type(error).__name__}: {error}"
            raise StepFailed(f"quickstart failed at step {number}/{len(steps)} ({name}): {detail}") from error
    print(f"\ndone in {time.time() - start:.0f} s: open {layout.out / 'report.md'}")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
