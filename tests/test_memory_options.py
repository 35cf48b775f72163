"""The options that cut a training step's memory: gradient checkpointing (same gradients, fewer saved activations,
no graph for the frozen teachers), the frozen encoders in bf16 (exact checkpoints), the 8-bit optimizer (refused
clearly without bitsandbytes), and the memory benchmark's composition."""
from __future__ import annotations

import copy
import sys
import types

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

import fcdiffusion_train
from fcdiffusion.apps.train_memory import Build, Step, compose, fit_line, fits, project, static_bytes
from fcdiffusion.core import memory
from fcdiffusion.core.frequency import CONTROL_MODES
from fcdiffusion.train.training import (
    OPTIMIZER_KEY,
    apply_latent_cache,
    apply_memory_options,
    check_train_section,
    resume_checkpoint,
)
from ldm.models.diffusion.ddpm import LatentDiffusion
from tests.helpers import tiny_model, train_args
from tests.test_distiller import fixed_inputs, make_distiller


def saved_bytes(fn) -> tuple[object, int]:
    """`fn()`'s result and the bytes autograd saved for backward while it ran."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, total


def student_gradients(distiller, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    memory.set_gradient_checkpointing(distiller.models(), checkpointing)
    z, context, steps, noise = fixed_inputs(distiller)
    distiller.train()
    distiller.student.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    (loss, _), saved = saved_bytes(lambda: distiller.distillation_loss(z, context, CONTROL_MODES, steps, noise))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in distiller.student.named_parameters() if p.grad is not None}
    return grads, saved


def test_checkpointing_gives_the_same_gradients_with_fewer_saved_activations(workdir, model_config, distill_config):
    distiller = make_distiller(workdir, model_config, distill_config)
    without, saved_without = student_gradients(distiller, False)
    with_checkpointing, saved_with = student_gradients(distiller, True)
    assert without.keys() == with_checkpointing.keys() and any(g.abs().sum() > 0 for g in without.values())
    for name, grad in without.items():
        torch.testing.assert_close(with_checkpointing[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert saved_with < 0.7 * saved_without  # the blocks' activations are recomputed, not kept

    # The frozen teachers' solve keeps no graph, with or without checkpointing.
    z, context, steps, noise = fixed_inputs(distiller)
    t, t_prev = distiller.student_schedule(steps)
    conds = [distiller.student.condition(z, context, mode) for mode in CONTROL_MODES]
    x_t = distiller.student.q_sample(z.repeat(len(CONTROL_MODES), 1, 1, 1), t, noise)
    target, saved = saved_bytes(lambda: distiller.teacher_targets(x_t, t, t_prev, CONTROL_MODES, conds))
    assert saved == 0 and target.grad_fn is None


def test_gradient_checkpointing_flag_switches_every_block_of_teachers_and_student(workdir, model_config,
                                                                                 distill_config):
    distiller = make_distiller(workdir, model_config, distill_config)
    blocks = [b for m in distiller.models() for b in m.modules() if hasattr(b, "_forward")]
    assert blocks and not any(b.use_checkpoint for b in blocks)  # the tiny config keeps activations
    train = OmegaConf.create({"gradient_checkpointing": True, "encoder_dtype": "fp32", "optimizer": "adamw"})
    apply_memory_options(distiller, train)
    assert all(b.use_checkpoint for b in blocks)
    train.gradient_checkpointing = None  # None leaves the model config's choice alone
    apply_memory_options(distiller, train)
    assert all(b.use_checkpoint for b in blocks)


def test_frozen_encoders_in_bf16_hand_on_float32_and_keep_checkpoints_exact(tiny_files):
    model = tiny_model(tiny_files)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {"jpg": torch.rand(2, 64, 64, 3) * 2 - 1, "txt": ["a cat", "a dog"]}
    z32, context32 = LatentDiffusion.get_input(model, batch, sample_posterior=False)
    assert memory.cast_frozen_encoders([model], torch.bfloat16) > 0
    assert all(p.dtype == torch.bfloat16 for p in model.first_stage_model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.cond_stage_model.parameters())
    assert next(model.control_model.parameters()).dtype == torch.float32
    z, context = LatentDiffusion.get_input(model, batch, sample_posterior=False)
    assert z.dtype == context.dtype == torch.float32
    torch.testing.assert_close(z, z32, rtol=0.05, atol=0.05)
    torch.testing.assert_close(context, context32, rtol=0.05, atol=0.05)
    assert model.decode_first_stage(z).dtype == torch.float32
    state = model.state_dict()  # a checkpoint written now holds the exact float32 values
    assert state.keys() == before.keys()
    assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in before.items())
    loss, _ = model.shared_step(batch)  # and a training step runs
    loss.backward()
    assert model.control_model.input_hint_block[0].weight.grad is not None


def test_eight_bit_optimizer_is_refused_clearly_without_bitsandbytes(tiny_files, tmp_path, monkeypatch, capsys):
    real_find_spec = memory.importlib.util.find_spec
    monkeypatch.setattr(memory.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="needs bitsandbytes.*pip install bitsandbytes"):
        memory.check_optimizer("adamw8bit")
    with pytest.raises(ValueError, match="adamw, adamw8bit"):
        memory.check_optimizer("sgd")
    # The script refuses before building any model or creating the run folder.
    logdir = tmp_path / "logs"
    assert fcdiffusion_train.main(train_args(tiny_files, logdir, "--optimizer", "adamw8bit")) == 1
    assert "needs bitsandbytes" in capsys.readouterr().err and not logdir.exists()


def test_eight_bit_optimizer_comes_from_bitsandbytes_when_installed(monkeypatch):
    made = {}

    class AdamW8bit(torch.optim.SGD):
        def __init__(self, params, lr):
            made["lr"] = lr
            super().__init__(params, lr=lr)

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    monkeypatch.setattr(memory.importlib.util, "find_spec", lambda name, *a: object())
    optimizer = memory.make_optimizer([torch.nn.Parameter(torch.zeros(3))], 1e-4, "adamw8bit")
    assert isinstance(optimizer, AdamW8bit) and made["lr"] == 1e-4
    check_train_section(OmegaConf.create({**TRAIN, "optimizer": "adamw8bit"}))  # accepted when installed


TRAIN = {"max_steps": 1, "batch_size": 1, "checkpoint_every": 1, "resolution": 64, "num_nodes": 1, "num_workers": 0,
         "log_images_every": 0, "learning_rate": 1e-4, "precision": "fp32"}


def test_run_options_are_checked_before_any_model(tmp_path):
    for bad, message in (({"encoder_dtype": "fp16"}, "--encoder_dtype"), ({"optimizer": "lion"}, "--optimizer"),
                         ({"gradient_checkpointing": "sometimes"}, "--gradient_checkpointing"),
                         ({"cache_images": "yes"}, "train.cache_images"), ({"cache_latents": 1}, "train.cache_latents"),
                         ({"cache_latents": True, "augment": {"hflip": True}}, "leave out train.augment")):
        with pytest.raises(ValueError, match=message):
            check_train_section(OmegaConf.create({**TRAIN, **bad}))
    with pytest.raises(ValueError, match="no frozen VAE"):
        apply_latent_cache(pl.LightningModule(), OmegaConf.create({"cache_latents": True}))
    # A run resumes only with the optimizer whose state its checkpoint holds.
    folder = tmp_path / "run"
    folder.mkdir()
    torch.save({"state_dict": {}, "global_step": 3, OPTIMIZER_KEY: "adamw8bit"}, folder / "last.ckpt")
    with pytest.raises(ValueError, match="--optimizer adamw8bit"):
        resume_checkpoint(folder, 10, "adamw")
    assert resume_checkpoint(folder, 10, "adamw8bit").step == 3


def test_optimizer_state_and_gradient_bytes_are_exact():
    big, small = torch.nn.Parameter(torch.zeros(10_000)), torch.nn.Parameter(torch.zeros(100))
    assert memory.optimizer_state_bytes([big, small], "adamw") == 8 * 10_100
    assert memory.optimizer_state_bytes([big, small], "adamw8bit") == 2 * (10_000 + 4 * 40) + 8 * 100
    assert memory.gradient_bytes([big, small.to(torch.bfloat16)]) == 4 * 10_000 + 2 * 100
    states = torch.optim.AdamW([big, small], lr=1e-3, foreach=False)
    (big.sum() + small.sum()).backward()
    states.step()
    held = sum(v.numel() * v.element_size() for s in states.state.values() for v in s.values() if v.numel() > 1)
    assert held == memory.optimizer_state_bytes([big, small], "adamw")


def test_projection_composition_and_cards():
    intercept, slope = fit_line([(1.0, 3.0), (3.0, 7.0)])
    assert (intercept, slope) == (1.0, 2.0)
    records = [{"step": {"resolution": r}, "dynamic_bytes": 100 + 10_000 * r * r} for r in (64, 128)]
    projected = project(records, 512)
    assert projected["how"] == "projected" and projected["bytes"] == pytest.approx(100 + 10_000 * 512 ** 2)
    assert project(records, 128)["how"] == "measured" and not projected["lower_bound"]
    flat = [{"step": {"resolution": r}, "dynamic_bytes": 500 * 2 ** 20} for r in (64, 128)]
    assert project(flat, 512)["lower_bound"]  # no growth resolved: only a lower bound
    assert project(records[:1], 512)["bytes"] is None  # one size cannot be projected
    assert fits(21.9 * 2 ** 30) == {"16GB": False, "24GB": True, "40GB": True, "80GB": True}
    assert fits(80 * 2 ** 30)["80GB"] is False


def test_composed_figures_add_exact_static_bytes_to_the_measured_part(model_config):
    build = Build("distiller", "control_net", "bf16", "bf16", 1)
    records = [{"build": vars(build), "step": vars(Step(True, "bf16", r)), "dynamic_bytes": 1000 * r * r,
                "peak_bytes": 0, "measure": "cpu_peak_rss_above_resident", "optimizer": None} for r in (64, 128)]
    rows = compose(model_config, records, 128, ["adamw"])
    row = next(r for r in rows if r["role"] == "distiller" and r["trainable"] == "control_net"
               and r["teacher_dtype"] == "bf16" and r["gradient_checkpointing"] and r["precision"] == "bf16-mixed")
    assert row["how"] == "composed, measured"
    assert row["peak_bytes"] == sum(row["static"].values()) + 1000 * 128 * 128
    assert row["static"]["optimizer_state"] == 2 * row["static"]["gradients"]
    missing = next(r for r in rows if r["role"] == "teacher")
    assert missing["peak_bytes"] is None and missing["how"] == "not measured"
    # The frozen encoders in bf16 take exactly their parameters' two bytes off the weights.
    from fcdiffusion.apps.train_memory import build_module

    fp32 = Build("teacher", "control_net", "fp32", "fp32")
    module = build_module(model_config, fp32, 64)
    encoders = sum(p.numel() for n in ("first_stage_model", "cond_stage_model")
                   for p in getattr(module, n).parameters())
    half = static_bytes(module, Build("teacher", "control_net", "fp32", "bf16"), "adamw")
    assert static_bytes(module, fp32, "adamw")["weights"] - half["weights"] == 2 * encoders


def test_cpu_adamw_runs_foreach_and_ends_bit_identical_to_the_single_tensor_loop():
    """make_optimizer's AdamW on a CPU takes the multi-tensor form (`ldm.util.FOREACH`), whose weights must be the
    single-tensor loop's, bit for bit, after steps with moments, bias corrections and weight decay at work."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(),
                              torch.nn.Conv2d(8, 3, 1))
    twin, start = copy.deepcopy(net), copy.deepcopy(net)
    ours = memory.make_optimizer(list(net.parameters()), 1e-2)
    loop = torch.optim.AdamW(twin.parameters(), lr=1e-2, foreach=False)
    assert ours.defaults["foreach"] is True and not ours.defaults["fused"]
    for step in range(5):
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        for model, optimizer in ((net, ours), (twin, loop)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(net.parameters(), start.parameters()))
