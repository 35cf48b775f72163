"""Peak memory of one training step, teacher and distiller, at the SD 2.1-base architecture (random weights), over
the recipes that matter, and which GPU (16, 24, 40, 80 GB) each fits: `make memory-benchmark`.

    python benchmarks/memory_benchmark.py                       # CUDA: the allocator's peak; CPU: counted, 512 px
    python benchmarks/memory_benchmark.py --measure rss --resolutions 128 192 --guard_gib 9   # CPU cross-check

Each build (teacher or distiller, trained set, teachers' dtype) is measured in its own process, one at a time, killed
when its resident set passes `--guard_gib` (what it measured until then is kept), by `--measure`:
- `cuda` (the default on a GPU): the allocator's peak over two real optimizer steps (`torch.cuda.max_memory_allocated`),
  with the step time;
- `count` (the default on a CPU): the same two steps of the same whole module at `--target` px on fake tensors (no
  memory, no compute; one to two minutes a build), every tensor counted op by op;
- `rss`: real steps at the small `--resolutions`, the process's peak resident set above its weights projected to
  `--target` px and added to the exact bytes of the weights, gradients and optimizer state; each record also counts
  its step's tensors, the cross-check of `count`.
How: `fcdiffusion/apps/train_memory.py`. Writes the records (`--records`, JSON lines, reused by a later run with
`--reuse`), the figures (`--out`) and the table (`--markdown`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from fcdiffusion import cli
from fcdiffusion.apps.train_memory import (
    CARDS_GIB,
    GIB,
    HEADROOM_GIB,
    MEASURES,
    TEACHER_SETS,
    TRAINABLE_SETS,
    Build,
    Step,
    compose,
    emit_json_line,
    measure_build,
    table_markdown,
    worker_environment,
)
from fcdiffusion.core.devices import device_name, resolve_device
from fcdiffusion.core.memory import OPTIMIZERS, check_optimizer
from fcdiffusion.train.dataset import LATENT_GRID
from ldm.util import atomic_write_text, load_config

MARK = "MEASURED "


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--sd_config", default="configs/model_config.yaml")
    cli.add_device_flag(parser)
    parser.add_argument("--measure", choices=sorted(MEASURES),
                        help="how: cuda (the allocator's peak), count (tensors counted on fake tensors) or rss (a CPU "
                             "process's resident set, projected); default: cuda on a GPU, else count")
    parser.add_argument("--resolutions", type=int, nargs="+",
                        help="image sizes measured (default: --target, and 128 192 for --measure rss)")
    parser.add_argument("--target", type=int, default=512, help="image size of the table")
    parser.add_argument("--samples", type=int, default=4,
                        help="images per step through the trained network (a teacher's batch; the distiller's batch "
                             "x modes: 4 = one image per mode)")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS,
                        help="optimizers in the table (on CUDA the installed ones are also measured)")
    parser.add_argument("--only", nargs="+", metavar="KEY",
                        help="measure only the builds whose key (role/trained set/teachers_dtype) contains one of "
                             "these")
    parser.add_argument("--guard_gib", type=float, default=9.0,
                        help="kill a measuring process whose resident set passes this (GiB)")
    parser.add_argument("--threads", type=int, help="torch threads per measuring process")
    parser.add_argument("--records", default="outputs/memory/records.jsonl", help="measurements, one JSON a line")
    parser.add_argument("--reuse", action="store_true", help="keep the records already in --records and measure "
                                                             "only the builds they lack")
    parser.add_argument("--out", default="outputs/memory/memory.json")
    parser.add_argument("--markdown", default="outputs/memory/memory_table.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one build (JSON) in this process
    return parser


def plan(measure: str, resolutions: Sequence[int], samples: int) -> tuple[list[Build], list[Step]]:
    """The builds to measure and the steps each measures. Measuring `cuda` or `count`: the full modules, each
    frozen-encoder dtype; `rss`: one teacher per distiller, the distillers' encoders in bf16 and the teachers' in
    float32 (their weights are composed exactly either way; a teacher's float32 step is its quickest on a CPU
    without bf16 instructions, where a bf16 convolution runs tens of times slower), and the float32-teacher
    distiller that trains a float32 control net last (it may pass the guard; a proxy stands in). The recipes the
    README recommends come first, so a run cut short has them."""
    steps = [Step(c, p, r, samples) for r in resolutions for c in (True, False) for p in ("fp32", "bf16")]
    if measure != "rss":
        builds = [Build("teacher", t, "fp32", e) for t in TEACHER_SETS for e in ("fp32", "bf16")]
        builds += [Build("distiller", t, "fp32", e) for t in TRAINABLE_SETS for e in ("fp32", "bf16")]
        builds += [Build("distiller", t, "bf16", "bf16") for t in TRAINABLE_SETS]
        return builds, steps
    builds = [Build("distiller", t, "bf16", "bf16", 1) for t in TEACHER_SETS]
    builds += [Build("teacher", t, "fp32", "fp32", 1) for t in reversed(TEACHER_SETS)]
    builds += [Build("distiller", "lora", d, "bf16", 1) for d in ("bf16", "fp32")]
    builds += [Build("distiller", t, "fp32", "bf16", 1) for t in TEACHER_SETS]
    return builds, steps


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure_in_child(build: Build, steps: Sequence[Step], args: argparse.Namespace, optimizers: Sequence[str],
                     records: Path) -> tuple[int, str]:
    """Run one build's measurements in a niced child process under the resident-set guard; append its records to
    `records` as they come. Returns (how many records, why it ended)."""
    job = json.dumps({"build": asdict(build), "steps": [asdict(s) for s in steps], "optimizers": list(optimizers)})
    cmd = [sys.executable, __file__, "--worker", job, "--sd_config", args.sd_config, "--device", args.device,
           "--measure", args.measure]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=worker_environment(args.threads),
                             preexec_fn=lambda: os.nice(10))
    guard = args.guard_gib * GIB
    killed = threading.Event()

    def watch() -> None:
        while child.poll() is None:
            if rss_bytes(child.pid) > guard:
                killed.set()
                child.kill()
                return
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    count = 0
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith(MARK):
            with open(records, "a") as out:
                out.write(line[len(MARK):])
            count += 1
            record = json.loads(line[len(MARK):])
            took = "" if record["step_s"] is None else f", {record['step_s']} s"
            print(f"  {record['step']} -> {record['dynamic_bytes'] / GIB:.2f} GiB above the weights "
                  f"(peak {record['peak_bytes'] / GIB:.2f} GiB{took})", flush=True)
    status = child.wait()
    if killed.is_set():
        return count, f"killed: resident set above {args.guard_gib} GiB"
    return count, "done" if status == 0 else f"failed with status {status}"


def run_worker(args: argparse.Namespace) -> None:
    job = json.loads(args.worker)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = OmegaConf.to_container(load_config(args.sd_config).model, resolve=True)
    device = resolve_device(args.device)
    optimizers = [name for name in job["optimizers"] if name == "adamw" or _installed(name)]
    measure_build(config, Build(**job["build"]), [Step(**s) for s in job["steps"]], device, optimizers,
                  emit_json_line, args.measure)


def _installed(name: str) -> bool:
    try:
        check_optimizer(name)
    except ValueError:
        return False
    return True


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """Measure every planned build in its own process, then compose, print and write the table."""
    if args.worker:
        run_worker(args)
        return
    device = resolve_device(args.device)
    args.measure = args.measure or ("cuda" if device.type == "cuda" else "count")
    if args.measure == "cuda" and device.type != "cuda":
        raise ValueError(f"--measure cuda needs a CUDA device, got {device}: use --measure count or rss")
    resolutions = args.resolutions or ([128, 192] if args.measure == "rss" else [args.target])
    if any(size < LATENT_GRID or size % LATENT_GRID for size in [args.target, *resolutions]):
        raise ValueError(f"--target and --resolutions must be multiples of {LATENT_GRID} px, got {args.target} and "
                         f"{resolutions}")
    if args.guard_gib <= 0 or args.samples < 1:
        raise ValueError("--guard_gib must be positive and --samples at least 1")
    builds, steps = plan(args.measure, resolutions, args.samples)
    if args.only:
        builds = [b for b in builds if any(part in b.key() for part in args.only)]
    records_path = Path(args.records)
    records_path.parent.mkdir(parents=True, exist_ok=True)
    if not args.reuse:
        records_path.write_text("")
    done = {json.dumps(r["build"], sort_keys=True) for r in read_records(records_path)}
    runs = {}
    for build in builds:
        if json.dumps(asdict(build), sort_keys=True) in done:
            print(f"{build.key()}: reusing its records", flush=True)
            continue
        print(f"{build.key()} ({build.teachers} teacher(s), encoders {build.encoder_dtype}) ...", flush=True)
        count, why = measure_in_child(build, steps, args, args.optimizers, records_path)
        runs[build.key()] = {"records": count, "ended": why}
        print(f"  {count} records, {why}", flush=True)
    records = read_records(records_path)
    config = OmegaConf.to_container(load_config(args.sd_config).model, resolve=True)
    rows = compose(config, records, args.target, args.optimizers)
    table = table_markdown(rows, args.optimizers)
    print("\n" + table)
    figures: dict[str, Any] = {
        "hardware": {"device": device_name(device), "torch": torch.__version__}, "measure": args.measure,
        "target_resolution": args.target, "measured_resolutions": resolutions, "samples_per_step": args.samples,
        "cards_gib": list(CARDS_GIB), "headroom_gib": HEADROOM_GIB, "runs": runs, "rows": rows, "records": records}
    atomic_write_text(args.out, json.dumps(figures, indent=2) + "\n")
    atomic_write_text(args.markdown, table)
    print(f"wrote {args.out} and {args.markdown}")


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
