"""The whole pipeline on an embedded tiny default, from nothing to pictures and tables (`make quickstart`).

Runs, in order, the same scripts a GPU user runs with the real weights, on tiny random stand-ins built here:
  1. a tiny SD-layout base checkpoint and OpenCLIP text tower, where the tiny configs expect them
  2. scikit-image's photos with captions, in the training-data layout
  3. training_data_prepare.py          4. tool_add_control_sd21.py
  5-8. fcdiffusion_train.py, one teacher per control mode
  9. fcdiffusion_distill.py            10-11. test_distillation.py (teachers, then the student)
  12. evaluate.py (band fidelity of both, the student's agreement with its teachers)
  13. benchmarks/distillation_benchmark.py
  14. outputs/quickstart/: grid.png, losses.png, the tables, the evaluation and report.md
Re-running reuses what exists (training resumes from its last checkpoint and stops at once when done);
`--restart` starts over. Random weights show that the pipeline works and how fast it is, not image quality.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fcdiffusion.frequency import CONTROL_MODES
from fcdiffusion.paths import student_file, teacher_checkpoint

TINY_TEACHER_CONFIG = "configs/model_config_tiny.yaml"
TINY_DISTILL_CONFIG = "configs/distill_config_tiny.yaml"


class StepFailed(RuntimeError):
    """A quickstart step failed; the message names the step."""


@dataclass
class Layout:
    """Every path the quickstart reads or writes, under `root` (the repository by default)."""

    root: Path
    out: Path

    @property
    def sd(self) -> Path:
        return self.root / "models" / "v2-1_tiny.ckpt"

    @property
    def clip(self) -> Path:
        return self.root / "CLIP-ViT-H-14" / "open_clip_tiny.bin"

    @property
    def init(self) -> Path:
        return self.root / "models" / "fcdiffusion_init_tiny.ckpt"

    @property
    def photos(self) -> Path:
        return self.root / "datasets" / "quickstart" / "photos"

    @property
    def data(self) -> Path:
        return self.root / "datasets" / "quickstart" / "training_data.json"

    @property
    def logdir(self) -> Path:
        return self.out / "lightning_logs"

    def teacher(self, mode: str) -> Path:
        return teacher_checkpoint(self.logdir, mode)

    @property
    def student(self) -> Path:
        return student_file(self.logdir)

    @property
    def clip_override(self) -> str:
        return f"model.params.cond_stage_config.params.version={self.clip}"


def run_script(args: Sequence[str]) -> None:
    """Run a repository script with this interpreter; raise on a non-zero exit."""
    command = [sys.executable, *map(str, args)]
    print("  $ " + " ".join(command[1:]), flush=True)
    code = subprocess.call(command, cwd=Path(__file__).resolve().parent)
    if code:
        raise StepFailed(f"`{' '.join(command[1:])}` exited with status {code}")


def build_steps(layout: Layout, args: argparse.Namespace) -> list[tuple[str, Callable[[], None]]]:
    """The ordered (name, action) pairs of the pipeline."""

    def base() -> None:
        if layout.sd.is_file() and layout.clip.is_file():
            print(f"  reusing {layout.sd} and {layout.clip}")
            return
        from fcdiffusion.tiny_base import build_tiny_base

        build_tiny_base(layout.sd, layout.clip)

    def photos() -> None:
        from fcdiffusion.demo_data import export_demo_dataset

        export_demo_dataset(layout.photos, names=args.photos or None)

    def init() -> None:
        if layout.init.is_file():
            print(f"  reusing {layout.init}")
            return
        run_script(["tool_add_control_sd21.py", layout.sd, layout.init, "--config", TINY_TEACHER_CONFIG])

    def teacher(mode: str) -> Callable[[], None]:
        return lambda: run_script([
            "fcdiffusion_train.py", "--config", TINY_TEACHER_CONFIG, "--control_mode", mode,
            "--resume_path", layout.init, "--data", layout.data, "--logdir", layout.logdir,
            "--max_steps", args.teacher_steps, "--checkpoint_every", args.teacher_steps,
            "--log_images_every", args.teacher_steps, layout.clip_override])

    steps: list[tuple[str, Callable[[], None]]] = [
        ("build the tiny base model and text tower", base),
        ("export scikit-image photos with captions", photos),
        ("index the training data (training_data_prepare.py)",
         lambda: run_script(["training_data_prepare.py", "--data_root", layout.photos, "--output", layout.data])),
        ("add the control net (tool_add_control_sd21.py)", init),
    ]
    steps += [(f"train the {mode} teacher (fcdiffusion_train.py)", teacher(mode)) for mode in CONTROL_MODES]
    steps += [
        ("distill one student from the four teachers (fcdiffusion_distill.py)", lambda: distill(layout, args)),
        (f"run the teachers, {args.teacher_sample_steps} guided steps (test_distillation.py)",
         lambda: infer(layout, args, "teacher")),
        (f"run the student, {args.student_steps} steps (test_distillation.py)", lambda: infer(layout, args, "student")),
        ("evaluate band fidelity and teacher agreement (evaluate.py)", lambda: evaluate(layout)),
        ("benchmark speed, fidelity and memory", lambda: benchmark(layout, args)),
        ("write grid.png, losses.png and report.md", lambda: report(layout, args)),
    ]
    return steps


def distill(layout: Layout, args: argparse.Namespace) -> None:
    teachers = [arg for mode in CONTROL_MODES for arg in (f"--teacher_{mode}", layout.teacher(mode))]
    run_script(["fcdiffusion_distill.py", "--config", TINY_DISTILL_CONFIG, *teachers,
                "--student_init", layout.teacher("mid_pass"), "--student_steps", args.student_steps,
                "--data", layout.data, "--logdir", layout.logdir, "--max_steps", args.distill_steps,
                "--checkpoint_every", args.distill_steps, "--log_images_every", args.distill_steps,
                layout.clip_override])


def infer(layout: Layout, args: argparse.Namespace, which: str) -> None:
    """Weight files describe themselves: the student samples its own `student_steps` in every mode it learned,
    each teacher its own mode; no config is passed."""
    common = ["--input_dir", layout.photos / "00000", "--resolution", 128]
    if which == "student":
        run_script(["test_distillation.py", *common, "--student", layout.student,
                    "--out_dir", layout.out / "inference" / "student"])
        return
    for mode in CONTROL_MODES:
        run_script(["test_distillation.py", *common, "--teacher", layout.teacher(mode),
                    "--steps", args.teacher_sample_steps, "--out_dir", layout.out / "inference" / "teacher"])


def evaluate(layout: Layout) -> None:
    """The metrics that mean something without real weights: band fidelity of both, the student's agreement with
    its teachers. Every model here shares one VAE and one set of band edges, so the student file serves for both."""
    common = ["evaluate.py", "--input_dir", layout.photos / "00000", "--model", layout.student]
    inference, out = layout.out / "inference", layout.out / "evaluation"
    run_script([*common, "--results", inference / "student", "--reference", inference / "teacher",
                "--metrics", "band", "teacher_agreement", "--out", out / "student.json"])
    run_script([*common, "--results", inference / "teacher", "--metrics", "band", "--out", out / "teacher.json"])


def benchmark(layout: Layout, args: argparse.Namespace) -> None:
    run_script(["benchmarks/distillation_benchmark.py", "--teachers_dir", layout.logdir, "--student", layout.student,
                "--sd_resolution", args.sd_resolution, "--sd" if args.benchmark_sd else "--no-sd",
                "--teacher_steps", args.teacher_sample_steps, "--images", args.benchmark_images,
                "--out", layout.out / "benchmark.json"])


def report(layout: Layout, args: argparse.Namespace) -> None:
    """grid.png (a row per photo: source, then control / teacher / student per mode), losses.png (the training
    losses of the teachers and the distiller), tables.md and report.md."""
    import torch

    from fcdiffusion.benchmark import format_tables
    from fcdiffusion.dataset import load_image
    from fcdiffusion.images import labelled_grid, save_png
    from fcdiffusion.loss_curves import plot_losses, read_losses
    from ldm.util import atomic_write_text

    inference = layout.out / "inference"
    names = sorted(p.stem for p in (inference / "student").glob("*_grid.png"))
    names = [n[: -len("_grid")] for n in names]
    if not names:
        raise StepFailed(f"no results found in {inference / 'student'}")

    def read(path: Path) -> torch.Tensor:
        return torch.from_numpy(load_image(path, 128)).permute(2, 0, 1)

    columns: dict[str, list] = {"source": []}
    for name in names:
        columns["source"].append(read(layout.photos / "00000" / f"{name}.png"))
        for mode in CONTROL_MODES:
            for label, path in ((f"{mode} control", inference / "student" / f"{name}_{mode}_control.png"),
                                (f"{mode} teacher", inference / "teacher" / f"{name}_{mode}.png"),
                                (f"{mode} student", inference / "student" / f"{name}_{mode}.png")):
                columns.setdefault(label, []).append(read(path))
    save_png(labelled_grid({k: torch.stack(v) for k, v in columns.items()}, row_labels=names), layout.out / "grid.png")
    runs = {f"{mode} teacher": f"fcdiffusion_{mode}" for mode in CONTROL_MODES} | {"distiller": "fcdiffusion_distill"}
    plot_losses({label: read_losses(layout.logdir / run) for label, run in runs.items()}, layout.out / "losses.png")
    results = json.loads((layout.out / "benchmark.json").read_text())
    tables = format_tables(results, args.teacher_sample_steps)
    atomic_write_text(layout.out / "tables.md", tables)
    evaluation = {who: (layout.out / "evaluation" / f"{who}.md").read_text() for who in ("teacher", "student")}
    atomic_write_text(layout.out / "report.md", REPORT.format(
        photos=len(names), teacher_steps=args.teacher_steps, distill_steps=args.distill_steps,
        sample_steps=args.teacher_sample_steps, student_steps=args.student_steps, tables=tables,
        teacher_metrics=evaluation["teacher"], student_metrics=evaluation["student"]))


REPORT = """# Quickstart report

The whole FCDiffusion pipeline ran on the embedded tiny default: a random SD-shaped model, {photos} scikit-image
photos, four teachers trained for {teacher_steps} steps each and one student distilled for {distill_steps} steps.
Random weights show that every step works and how fast the student is; they cannot show image quality (the
autoencoder was never trained, so decoded pictures look like noise).

## Pictures

[grid.png](grid.png): a row per photo; the source, then for each control mode the decoded control signal, the
teacher's {sample_steps}-step guided result and the student's {student_steps}-step result (same noise).
Per-image outputs: [inference/teacher/](inference/teacher/) and [inference/student/](inference/student/);
training grids: `lightning_logs/*/image_log/`.

![grid](grid.png)

Training losses (per step, and a 10-step moving average), from the runs' CSV logs:
[losses.png](losses.png)

![losses](losses.png)

## Figures

From [benchmark.json](benchmark.json) (also in [tables.md](tables.md)):

{tables}
## Evaluation

`evaluate.py` on the results above (definitions: `fcdiffusion/evaluation/`). band_error: how far the result's
controlled DCT band is from the source's (0: kept exactly); band_freedom: how much the other bands changed;
in the VAE's latent space (what the control net sees) and in pixels. teacher_latent_mse: the student's result
against the teacher's, re-encoded. CLIP score, DINO structure, LPIPS and FID/KID are left out here: with random
stand-in networks their numbers would mean nothing (the tests check their plumbing on such networks).

Teachers ({sample_steps} guided steps), [evaluation/teacher.json](evaluation/teacher.json),
![teacher metrics](evaluation/teacher.png):

{teacher_metrics}
Student ({student_steps} steps), [evaluation/student.json](evaluation/student.json),
![student metrics](evaluation/student.png):

{student_metrics}"""


def check_disk(path: Path, need_gb: float) -> None:
    """Refuse to start without `need_gb` GiB free where the outputs go."""
    path.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(path).free / 2**30
    if free_gb < need_gb:
        raise StepFailed(f"only {free_gb:.1f} GiB free at {path}, the quickstart needs {need_gb:.1f} GiB")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="where models/, CLIP-ViT-H-14/ and datasets/ are")
    parser.add_argument("--out", default="outputs/quickstart", help="where logs, pictures and tables go")
    parser.add_argument("--restart", action="store_true", help="delete what an earlier run built, start over")
    parser.add_argument("--photos", nargs="*", help="scikit-image photo names (default: all that ship)")
    parser.add_argument("--teacher_steps", type=int, default=200, help="training steps per teacher")
    parser.add_argument("--distill_steps", type=int, default=200, help="distillation steps")
    parser.add_argument("--student_steps", type=int, default=4, help="the student's sampling steps")
    parser.add_argument("--teacher_sample_steps", type=int, default=50, help="the teachers' DDIM steps")
    parser.add_argument("--benchmark_sd", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the SD 2.1-base architecture (random weights, reduced resolution)")
    parser.add_argument("--sd_resolution", type=int, default=128, help="image size for the SD-architecture timing")
    parser.add_argument("--benchmark_images", type=int, default=4, help="photos per benchmark measurement")
    parser.add_argument("--min_free_gb", type=float, default=2.0, help="refuse to start with less free disk")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    layout = Layout(Path(args.root), Path(args.out))
    if args.restart:
        for path in (layout.out, layout.sd, layout.clip, layout.init, layout.photos.parent):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    steps = build_steps(layout, args)
    start = time.time()
    try:
        check_disk(layout.out, args.min_free_gb)
    except StepFailed as error:
        print(f"quickstart refused to start: {error}", file=sys.stderr)
        return 1
    for number, (name, action) in enumerate(steps, 1):
        print(f"\n[{number}/{len(steps)}] {name}  ({time.time() - start:.0f} s so far)", flush=True)
        try:
            action()
        except Exception as error:  # any failure: say which step, keep the traceback short
            detail = str(error) if isinstance(error, StepFailed) else f"{type(error).__name__}: {error}"
            print(f"\nquickstart failed at step {number}/{len(steps)} ({name}): {detail}", file=sys.stderr)
            return 1
    print(f"\ndone in {time.time() - start:.0f} s: open {layout.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
