"""The benchmark's tiny-VAE rows and its extrapolated teacher timing."""
from __future__ import annotations

import pytest
import torch

from fcdiffusion.apps.benchmark import STUDENT_STEPS, extrapolate_teacher, fast_random_init, format_tables, speed


def test_extrapolated_teacher_time_is_linear_in_the_steps():
    figures = {"teacher_2_cfg_s": 1.5, "teacher_6_cfg_s": 3.5}  # 0.5 s per step, 0.5 s fixed
    out = extrapolate_teacher(figures, (6, 2), 50)
    assert out["teacher_50_cfg_s"] == pytest.approx(0.5 + 50 * 0.5)
    assert out["teacher_50_cfg_extrapolated"] == {"from_steps": [2, 6], "measured_s": [1.5, 3.5],
                                                  "per_step_s": 0.5, "fixed_s": 0.5}
    with pytest.raises(ValueError, match="two different step counts"):
        extrapolate_teacher(figures, (2, 2), 50)


def test_fast_random_init_keeps_each_initialiser_distribution_and_restores_torch():
    uniform_, normal_ = torch.Tensor.uniform_, torch.Tensor.normal_
    with fast_random_init(block=1000):
        layer = torch.nn.Linear(3000, 7)  # kaiming_uniform_: U(-1/sqrt(3000), 1/sqrt(3000)), 21,000 values
        wide = torch.empty(2500).normal_(2.0, 3.0)  # two whole blocks and half of one
        bounded = torch.empty(10).uniform_(-1.0, 0.0)
    bound = 3000 ** -0.5
    assert -bound <= layer.weight.min() < -0.95 * bound and 0.95 * bound < layer.weight.max() <= bound
    assert torch.equal(wide[:1000], wide[1000:2000]) and torch.equal(wide[2000:], wide[:500])  # one block, repeated
    assert wide.mean().item() == pytest.approx(2.0, abs=0.3) and wide.std().item() == pytest.approx(3.0, rel=0.1)
    assert bounded.min() >= -1.0 and bounded.max() <= 0.0
    assert (torch.Tensor.uniform_, torch.Tensor.normal_) == (uniform_, normal_)
    assert torch.empty(2000).uniform_().unique().numel() == 2000  # torch's own generator again


def test_speed_times_the_student_with_the_tiny_vae_and_extrapolates_the_teacher(model_config):
    figures = speed(model_config, 64, 1, 1, 8, torch.device("cpu"), tiny_vae="random",
                    teacher_timing_steps=(1, 2))
    assert "teacher_8_cfg_extrapolated" in figures and "teacher_1_cfg_s" in figures and "teacher_2_cfg_s" in figures
    record = figures["teacher_8_cfg_extrapolated"]
    assert figures["teacher_8_cfg_s"] == pytest.approx(record["fixed_s"] + 8 * record["per_step_s"])
    assert figures["tiny_vae"] == {"tiny_vae": "random weights", "tiny_vae_use": "both"}
    for k in STUDENT_STEPS:
        assert figures[f"student_{k}_tiny_vae_s"] > 0
        assert figures[f"tiny_vae_speedup_{k}"] == pytest.approx(figures[f"student_{k}_s"]
                                                                 / figures[f"student_{k}_tiny_vae_s"])
    assert figures["floor"]["tiny_vae_encode_s"] > 0 and figures["floor"]["tiny_vae_decode_s"] > 0
    tables = format_tables({"hardware": {"device": "CPU", "torch": "2"}, "speed": {"tiny": figures}}, 8)
    assert "extrapolated from its measured end-to-end times at 1 and 2 steps" in tables
    assert "| tiny | random weights | " in tables
