"""Counting a training step's tensors (`fcdiffusion.apps.tensor_memory`), the memory benchmark's `count` measure:
byte for byte what torch's own MemTracker counts, the same on fake tensors as on real ones, and a table whose every
recipe has a counted figure."""
from __future__ import annotations

import contextlib
import importlib.util
import json

import pytest
import torch
import torch.nn as nn
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._pytree import tree_leaves

from fcdiffusion.apps.tensor_memory import TensorMemory, fake_tensors
from fcdiffusion.apps.train_memory import (
    MEASURES,
    TRAJECTORY_POOL,
    Build,
    Step,
    _measure_steps,
    build_module,
    compose,
    measure_build,
    models_of,
    prepare_module,
    random_batch,
    run_step,
    static_bytes,
    trained_parameters,
    trajectory_bytes,
)
from fcdiffusion.core.memory import optimizer_state_bytes, set_gradient_checkpointing
from ldm.util import load_config
from tests.helpers import ROOT

_spec = importlib.util.spec_from_file_location("memory_benchmark_script", ROOT / "benchmarks/memory_benchmark.py")
memory_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory_benchmark)


def small_network() -> nn.Module:
    """Convolutions, a norm and attention through SDPA: the kinds of layer whose saved tensors a UNet step holds."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 32, 3, padding=1)
            self.norm = nn.GroupNorm(4, 32)
            self.qkv = nn.Linear(32, 96)
            self.out = nn.Conv2d(32, 3, 1)

        def forward(self, x):
            h = torch.nn.functional.silu(self.norm(self.conv(x)))
            b, c, hh, ww = h.shape
            tokens = h.flatten(2).transpose(1, 2)
            q, k, v = self.qkv(tokens).chunk(3, dim=-1)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.out(a.transpose(1, 2).reshape(b, c, hh, ww))

    return Net()


def two_steps(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, checkpointing: bool,
              counter: object) -> None:
    for _ in range(2):
        if isinstance(counter, MemTracker):
            counter.reset_mod_stats()  # its per-module figures are per iteration; the peak stays
        out = torch.utils.checkpoint.checkpoint(net, x, use_reentrant=False) if checkpointing else net(x)
        out.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fake", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_counted_peak_is_torchs_mem_tracker_peak_byte_for_byte(fake, checkpointing):
    """The oracle: torch.distributed's MemTracker on the same two AdamW steps (it needs every parameter to train)."""
    def run(counter_for):
        with fake_tensors() if fake else contextlib.nullcontext():
            torch.manual_seed(0)
            net = small_network()
            optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
            x = torch.randn(2, 3, 16, 16)
            counter = counter_for(net, optimizer)
            with counter:
                two_steps(net, optimizer, x, checkpointing, counter)
            return counter

    ours = run(lambda net, optimizer: TensorMemory([*net.parameters(), *net.buffers()]))

    def tracker(net, optimizer):
        mem = MemTracker()
        mem.track_external(net, optimizer)
        return mem

    theirs = run(tracker)
    (device, snapshot), = theirs.get_tracker_snapshot("peak").items()
    assert ours.peak == snapshot["Total"] > 0
    params = sum(p.numel() * 4 for p in small_network().parameters())
    assert ours.peak > 3 * params  # weights, gradients and two moments: the count sees the optimizer's state


def test_views_and_freed_tensors_are_counted_once_and_released():
    counter = TensorMemory()
    with counter:
        a = torch.zeros(1000)  # 4000 bytes
        view = a[:10]
        b = a + 1
        del b
        c = torch.ones(500)
    assert counter.current == 4000 + 2000 and counter.peak == 8000
    del a, view, c
    assert counter.current == 0 and counter.reset_peak() == 0 and counter.peak == 0


def test_a_step_counts_the_same_on_fake_tensors_as_on_real_ones(model_config):
    """The `count` measure runs the step on fake tensors; the same step on real tensors, counted the same way, makes
    the same tensors op for op, so its peak is the same but for one thing: the CPU kernel of `mse_loss` hands its
    scalar back in the storage of the elementwise losses (one latent batch), where the fake kernel allocates the
    scalar alone."""
    for build, steps in ((Build("teacher", "control_net", "fp32", "bf16"), [Step(True, "fp32", 64, 4)]),
                         (Build("distiller", "control_net+decoder", "bf16", "bf16", 2), [Step(False, "bf16", 64, 4)])):
        fake: list[dict] = []
        measure_build(model_config, build, steps, torch.device("cpu"), emit=fake.append, measure="count")
        torch.manual_seed(0)
        module = prepare_module(build_module(model_config, build, 64), build, torch.device("cpu"))
        real: list[dict] = []
        _measure_steps(module, steps, torch.device("cpu"), ["adamw"], {}, real.append, counted=True)
        channels = getattr(module, "student", module).channels
        latents = 4 * channels * 16 * 16 * 4  # four 16x16 latents of float32: 64 px, 4x downsampling
        for f, r in zip(fake, real, strict=True):
            assert 0 <= r["peak_bytes"] - f["peak_bytes"] <= latents
        assert all(r["measure"] == MEASURES["count"] and r["step_s"] is None for r in fake)
        static = static_bytes(module, build, "adamw")
        # The peak holds at least the weights, one set of gradients and AdamW's state, and the activations on top.
        assert all(r["peak_bytes"] > sum(static.values()) for r in fake)


def test_benchmark_counts_every_recipe_at_the_target_size(tmp_path):
    """`memory_benchmark.py` on a CPU counts by default, every build at the target size, and its table has a figure
    for every recipe (the tiny config, so that it takes seconds)."""
    out = tmp_path / "memory.json"
    status = memory_benchmark.main(["--sd_config", "configs/model_config_tiny.yaml", "--target", "64",
                                    "--records", str(tmp_path / "records.jsonl"), "--out", str(out),
                                    "--markdown", str(tmp_path / "table.md"), "--only", "distiller/lora/teachers_bf16"])
    assert status == 0
    figures = json.loads(out.read_text())
    assert figures["measure"] == "count" and figures["measured_resolutions"] == [64]
    counted = [r for r in figures["rows"] if r["how"] == "counted"]
    assert {(r["role"], r["trainable"], r["teacher_dtype"]) for r in counted} == {("distiller", "lora", "bf16")}
    assert len(counted) == 2 * 2 * 2  # checkpointing x precision x optimizer (bf16 teachers: bf16 encoders only)
    assert all(r["peak_bytes"] > sum(r["static"].values()) for r in counted)
    assert (tmp_path / "table.md").read_text().count("| counted |") == 4  # a line per recipe but the optimizer


def test_cuda_measure_is_refused_on_a_cpu(tmp_path, capsys):
    status = memory_benchmark.main(["--measure", "cuda", "--device", "cpu", "--records", str(tmp_path / "r.jsonl")])
    assert status != 0 and "--measure cuda needs a CUDA device" in capsys.readouterr().err


def test_a_distillers_figure_holds_its_full_trajectory_pool(model_config):
    """The trajectory objective keeps `trajectory_pool` solved examples on the training device: the recipe's pool
    (configs/distill_config.yaml) at the bytes a solve's trajectories hold, counted on fake tensors as on real ones
    and equal to their states, conditioning and guidance scales."""
    assert load_config("configs/distill_config.yaml").distill.trajectory_pool == TRAJECTORY_POOL
    build = Build("distiller", "control_net", "bf16", "bf16", 2)
    step = Step(True, "fp32", 64, 2)
    records: list[dict] = []
    measure_build(model_config, build, [step], torch.device("cpu"), emit=records.append, measure="count")
    counted = records[0]["trajectory_bytes"]
    torch.manual_seed(0)
    module = prepare_module(build_module(model_config, build, 64), build, torch.device("cpu"))
    batch = random_batch(step, 1)
    assert trajectory_bytes(module, batch) == counted
    with torch.no_grad():
        (one, *others) = module.solve_trajectories(*module.student.get_input(batch), module.modes)
    latent = 4 * 16 * 16  # one latent of a 64 px image (4x downsampling)
    context = one.cond["c_crossattn"][0]
    own = sum(t.numel() * t.element_size() for t in tree_leaves([one.cond, one.guidance_scale, one.states])
              if isinstance(t, torch.Tensor) and t is not context)
    # its own states, control latent, scale and label, and its share of the prompt's context (one per photo, for
    # every mode)
    assert counted == own + context.numel() * context.element_size() / len(module.modes)
    assert len(one.states) == 5 and sum(s.numel() for s in one.states.values()) == 5 * latent  # 4 steps: 5 states
    rows = compose(model_config, records, 64)
    row, eight = (next(r for r in rows if r["role"] == "distiller" and r["trainable"] == "control_net"
                       and r["teacher_dtype"] == "bf16" and r["gradient_checkpointing"] and r["precision"] == "32"
                       and r["optimizer"] == name) for name in ("adamw", "adamw8bit"))
    assert row["trajectory_pool_bytes"] == round(TRAJECTORY_POOL * counted)
    assert row["peak_bytes"] == records[0]["peak_bytes"] + row["trajectory_pool_bytes"] and row["how"] == "counted"
    # The 8-bit optimizer's row: AdamW's counted peak with the 8-bit state's exact bytes in place of AdamW's.
    trained = module.student.trainable_parameters()
    saved = optimizer_state_bytes(trained, "adamw") - optimizer_state_bytes(trained, "adamw8bit")
    assert row["peak_bytes"] - eight["peak_bytes"] == saved > 0
    # A counted figure stands only for its own build: nothing for the float32 teachers' or the teachers' recipes.
    assert all(r["peak_bytes"] is None for r in rows if r["teacher_dtype"] == "fp32" or r["role"] == "teacher")


def test_rss_records_count_their_steps_new_tensors_not_views_of_the_weights(model_config):
    """The `rss` cross-check's records count the step's new tensors beside the resident set: views of the weights
    (a linear layer keeps its transposed weight for backward) are not new, and checkpointing keeps fewer."""
    build = Build("teacher", "control_net", "fp32", "fp32", 1)
    records: list[dict] = []
    measure_build(model_config, build, [Step(True, "fp32", 64, 4), Step(False, "fp32", 64, 4)], torch.device("cpu"),
                  emit=records.append, measure="rss")
    on, off = (r["counted_dynamic_bytes"] for r in records)
    assert all(r["measure"] == MEASURES["rss"] and r["dynamic_bytes"] == r["peak_bytes"] - r["base_bytes"]
               for r in records)
    assert 0 < on < off
    # Counted from nothing, the same step's views of the weights would count as new (3.5 GiB at SD size, 128 px).
    module = prepare_module(build_module(model_config, build, 64), build, torch.device("cpu"))
    set_gradient_checkpointing(models_of(module), False)
    for p in trained_parameters(module):
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))  # as the rss step drops them
    with TensorMemory() as unseeded:
        run_step(module, random_batch(Step(False, "fp32", 64, 4), 4), Step(False, "fp32", 64, 4),
                 torch.device("cpu"), None)
    assert unseeded.peak > off
