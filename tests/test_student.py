"""The distilled student: a mode label per control mode, few-step sampling, LoRA, and what it refuses."""
from __future__ import annotations

import json

import pytest
import torch

from fcdiffusion.core.student import DISTILLED_SCHEDULER, FCDiffusionStudent, LoRALinear, student_config
from fcdiffusion.core.weights import build_on_meta, load_student, recorded
from fcdiffusion.train.distiller import FrequencyDistiller
from ldm.checkpoint import CheckpointMismatchError, load_checkpoint, load_state_dict, save_state_dict
from ldm.models.diffusion.sampling import sample
from ldm.models.diffusion.scheduler import Scheduler
from ldm.util import instantiate_from_config
from tests.helpers import teacher_paths, with_params


@pytest.fixture(scope="module")
def initial_student(workdir, model_config):
    """A self-describing student file made from the mid_pass teacher, the way the distiller initialises it, for the
    step counts the sampling tests run (1, 2, 3, 4, 8)."""
    path = workdir / "initial_student.safetensors"
    student = instantiate_from_config(with_params(student_config(model_config, student_steps=[1, 2, 3, 4, 8])))
    teacher = load_state_dict(teacher_paths(workdir / "logs")["mid_pass"])
    student.load_state_dict({**student.state_dict(), **teacher})
    save_state_dict(student.state_dict(), path, student.weights_metadata())
    return path


def test_student_config_drops_teacher_options_and_labels_the_modes(model_config):
    config = student_config(model_config, student_steps=3)
    params = config["params"]
    assert not {"control_mode", "ddim_steps", "sd_locked"} & set(params)
    assert params["control_stage_config"]["params"]["num_classes"] == 4 and params["student_steps"] == 3
    # The one w it learns (the teachers' scale) is recorded; no guidance embedding for a fixed-w student.
    assert params["guidance_scale"] == model_config["params"]["guidance_scale"] and params["guidance_range"] is None
    assert "guidance_embedding" not in params["control_stage_config"]["params"]
    assert "num_classes" not in model_config["params"]["control_stage_config"]["params"]  # the input is untouched
    with pytest.raises(ValueError, match="num_classes: 4"):
        teacher_control = model_config["params"]["control_stage_config"]
        build_on_meta({**config, "params": {**params, "control_stage_config": teacher_control}})


def test_mode_label_makes_one_student_differ_per_mode(initial_student):
    student = load_student(initial_student).eval()
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = student.get_learned_conditioning(["a house"])
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
    conds = {mode: student.condition(z, context, mode) for mode in ("low_pass", "mid_pass", "high_pass")}
    assert [int(c["y"][0]) for c in conds.values()] == [1, 2, 3]
    shared = {**conds["low_pass"]}  # one control signal, the four labels: only the label differs

    def eps(label: int) -> torch.Tensor:
        with torch.no_grad():
            return student.apply_model(x, t, {**shared, "y": torch.tensor([label])})

    assert all(torch.equal(eps(0), eps(i)) for i in range(1, 4))  # zero-initialised: a no-op
    with torch.no_grad():
        student.control_model.label_emb.weight.normal_(generator=torch.Generator().manual_seed(2))
    outputs = [eps(i) for i in range(4)]
    assert all(not torch.allclose(outputs[i], outputs[j]) for i in range(4) for j in range(i + 1, 4))
    with pytest.raises(ValueError, match="class label"):
        student.apply_model(x, t, {k: v for k, v in shared.items() if k != "y"})


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_sample_uses_trailing_steps_and_ends_at_alpha_one(initial_student, steps):
    student = load_student(initial_student).eval()
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = student.condition(z, student.get_learned_conditioning(["a tree"]), "mid_pass")
    seen, last = [], {}
    original = student.apply_model

    def recording(x, t, c):
        eps = original(x, t, c)
        seen.append(int(t[0]))
        last.update(x=x, t=int(t[0]), eps=eps)
        return eps

    student.apply_model = recording
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    out = student.sample(cond, x_T, steps=steps)
    assert seen == [round(1000 * (steps - i) / steps) - 1 for i in range(steps)]  # 999 first, no guidance pass
    a = student.alphas_cumprod[last["t"]]
    torch.testing.assert_close(out, (last["x"] - (1 - a).sqrt() * last["eps"]) / a.sqrt())  # alpha_prev = 1
    seen.clear()
    student.sample(cond, x_T)
    assert len(seen) == student.student_steps == 8  # its own default: the most it was trained for


def test_student_refuses_guidance_and_modes_it_did_not_learn(initial_student, model_config):
    student = load_student(initial_student).eval()
    z = torch.randn(1, 4, 16, 16)
    cond = student.condition(z, student.get_learned_conditioning(["a tree"]), "mid_pass")
    with pytest.raises(ValueError, match="fixed guidance scale \\(w=9\\).*guidance_scale=7.5.*guidance_range"):
        student.sample(cond, torch.randn(1, 4, 16, 16), guidance_scale=7.5)
    student.sample(cond, torch.randn(1, 4, 16, 16), steps=1, guidance_scale=9.0)  # its own w: nothing to refuse
    for request in ({"sampler": "dpmpp_2m"}, {"spacing": "uniform"}):
        with pytest.raises(ValueError, match="samples with ddim on the trailing schedule it was distilled for"):
            student.sample(cond, torch.randn(1, 4, 16, 16), **request)
    with pytest.raises(ValueError, match="steps"):
        student.sample(cond, torch.randn(1, 4, 16, 16), steps=0)
    partial = build_on_meta(student_config(model_config, modes=["low_pass", "high_pass"]))
    with pytest.raises(ValueError, match="low_pass, high_pass, not 'mid_pass'"):
        partial.check_mode("mid_pass")
    with pytest.raises(ValueError, match="valid modes"):
        partial.check_mode("band_pass")


def test_student_file_records_its_scheduler_and_files_from_before_sample_as_before(initial_student, tmp_path):
    state, metadata = load_checkpoint(initial_student)
    config = recorded(metadata, "config")
    assert config["params"]["scheduler"] == DISTILLED_SCHEDULER == {"sampler": "ddim", "spacing": "trailing",
                                                                    "final_alpha_cumprod": 1.0}
    # A file from before students recorded their scheduler: no `scheduler` entry, sampled exactly as before.
    del config["params"]["scheduler"]
    old = tmp_path / "old_scheduler.safetensors"
    save_state_dict(state, old, {**metadata, "fcdiffusion.config": json.dumps(config)})
    student, before = load_student(initial_student).eval(), load_student(old).eval()
    assert before.scheduler_config == DISTILLED_SCHEDULER
    assert recorded(before.weights_metadata(), "config")["params"]["scheduler"] == DISTILLED_SCHEDULER
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = student.condition(z, student.get_learned_conditioning(["a tree"]), "mid_pass")
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    for steps in (1, 3):
        expected = sample(student.apply_model, x_T,
                          Scheduler(student.alphas_cumprod, "trailing", 1.0).set_timesteps(steps).steps("cpu"), cond)
        assert torch.equal(student.sample(cond, x_T, steps), expected)
        assert torch.equal(before.sample(cond, x_T, steps), expected)


def test_sampling_follows_the_recorded_scheduler(initial_student):
    """`sample` builds its Scheduler from the record, and `check_sampling` refuses anything else."""
    _, metadata = load_checkpoint(initial_student)
    config = recorded(metadata, "config")
    other = {"sampler": "dpmpp_2m", "spacing": "uniform", "final_alpha_cumprod": None}
    config["params"]["scheduler"] = other
    student = load_student(initial_student, config).eval()
    assert student.scheduler_config == other and student.model_config()["params"]["scheduler"] == other
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = student.condition(z, student.get_learned_conditioning(["a tree"]), "mid_pass")
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = sample(student.apply_model, x_T, Scheduler(student.alphas_cumprod).set_timesteps(3).steps("cpu"), cond,
                      sampler="dpmpp_2m")
    assert torch.equal(student.sample(cond, x_T, 3, sampler="dpmpp_2m", spacing="uniform"), expected)
    with pytest.raises(ValueError, match="samples with dpmpp_2m on the uniform schedule"):
        student.check_sampling(sampler="ddim")
    for broken, message in [({**other, "sampler": "euler"}, "unknown sampler"),
                            ({**other, "spacing": "leading"}, "unknown timestep spacing"),
                            ({**other, "final_alpha_cumprod": 0.0}, "final_alpha_cumprod"),
                            ({"sampler": "ddim", "spacing": "trailing"}, "records exactly sampler, spacing")]:
        config["params"]["scheduler"] = broken
        with pytest.raises(ValueError, match=message):
            build_on_meta(config)


def test_a_student_file_from_before_label_emb_loads_with_its_config(initial_student, model_config, tmp_path):
    state = load_state_dict(initial_student)
    state["mode_embedding.weight"] = state.pop("control_model.label_emb.weight") + 1  # the old key, no metadata
    old = tmp_path / "old_student.safetensors"
    save_state_dict(state, old)
    with pytest.raises(ValueError, match="records no model config"):
        load_student(old)
    student = load_student(old, student_config(model_config))
    assert torch.equal(student.control_model.label_emb.weight, state["mode_embedding.weight"])


def test_lora_student_starts_as_its_init_and_trains_only_adapters(workdir, model_config, initial_student):
    plain = load_student(initial_student).eval()
    distiller = FrequencyDistiller(model_config, teacher_paths(workdir / "logs"), initial_student,
                                   {"trainable": ["lora"], "lora_rank": 2}, {"bands": {"all": 0}})
    lora = distiller.student.eval()
    assert isinstance(lora, FCDiffusionStudent)
    adapters = [m for m in lora.modules() if isinstance(m, LoRALinear)]
    assert adapters and all(not p.requires_grad for n, p in lora.control_model.named_parameters()
                            if not n.startswith("label_emb"))
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or n == "control_model.label_emb.weight" for n in trained)
    assert all(n.startswith("model.diffusion_model.output_blocks.") for n in trained if ".lora_" in n)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = plain.condition(z, plain.get_learned_conditioning(["a boat"]), "high_pass")
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([300])
    with torch.no_grad():
        torch.testing.assert_close(lora.apply_model(x, t, cond), plain.apply_model(x, t, cond))
        adapters[0].lora_up.weight.fill_(0.5)
        assert not torch.allclose(lora.apply_model(x, t, cond), plain.apply_model(x, t, cond))
    # No adapters in the file: not a LoRA student.
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        load_student(initial_student, student_config(model_config, trainable=["lora"], lora_rank=2))
