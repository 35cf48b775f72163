"""Fast inference and small files: bf16/fp16 weights, bf16 teachers in the distiller, delta files, cached work."""
from __future__ import annotations

import copy
import importlib.util
import shutil
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import export_delta
from fcdiffusion.apps.benchmark import format_tables, weight_file_bytes
from fcdiffusion.core.inference import Translator
from fcdiffusion.core.paths import student_file
from fcdiffusion.core.precision import prepare_for_inference
from fcdiffusion.core.weights import CONTROL_PREFIX, load_model, load_student, load_teacher, teacher_model_config
from fcdiffusion.train.dataset import load_image
from fcdiffusion.train.distiller import FrequencyDistiller
from ldm.checkpoint import CheckpointMismatchError, load_checkpoint, save_state_dict
from ldm.util import load_config
from tests.helpers import PHOTOS, ROOT, SD_DISTILL_CONFIG, teacher_paths

# bf16 keeps 8 significant bits (a relative rounding error of up to 2^-9 per operation); through the tiny
# student's ~20 layers, 2 sampling steps and the VAE the errors compound to a few percent of the signal
# (measured: about 1-5%). 0.1 relative L2 error leaves room for other CPUs' kernels while staying far below
# the gap between two different seeds (~130%), which the test checks too: bf16 must stay 10x closer to fp32.
BF16_RTOL = 0.1
FP16_RTOL = 0.02  # fp16 keeps 11 significant bits: 8x less rounding than bf16


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x.float() - reference.float()).norm() / reference.float().norm()).item()


def sources(workdir, resolution: int = 128) -> tuple[torch.Tensor, list[str]]:
    names = ["astronaut"]
    images = [torch.from_numpy(load_image(workdir / "photos" / f"{n}.png", resolution)).permute(2, 0, 1)
              for n in names]
    return torch.stack(images), [PHOTOS[n] for n in names]


@pytest.fixture(scope="module")
def delta(distilled, workdir, tmp_path_factory) -> SimpleNamespace:
    """The stand-in for the SD 2.1-base checkpoint the tiny teachers descend from (a teacher minus its control net:
    the keys `tool_add_control_sd21.py` reads from an SD checkpoint) and the student's delta file over it."""
    root = tmp_path_factory.mktemp("delta")
    state, _ = load_checkpoint(teacher_paths(workdir / "logs")["mid_pass"])
    files = SimpleNamespace(base=str(root / "v2-1_tiny_base.ckpt"), student=root / "student_delta.safetensors")
    save_state_dict({k: v for k, v in state.items() if not k.startswith(CONTROL_PREFIX)}, files.base)
    assert export_delta.main([str(student_file(distilled)), str(files.student), "--base", files.base]) == 0
    return files


def test_bf16_and_fp16_inference_on_cpu_stay_close_to_fp32(distilled, workdir):
    student = load_student(student_file(distilled)).eval()
    images, prompts = sources(workdir, 64)  # a CPU without bf16 units runs bf16 convolutions slowly
    run = lambda model, seed=0: Translator(model)(images, prompts, ["high_pass"], seed=seed,  # noqa: E731
                                                  steps=2, decode_control=False)
    reference, other_seed = run(student), run(student, seed=7)
    for precision, rtol, vae in (("bf16", BF16_RTOL, torch.bfloat16), ("fp16", FP16_RTOL, torch.float32)):
        model = prepare_for_inference(copy.deepcopy(student), "cpu", precision)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        assert model.control_model.input_blocks[0][0].weight.dtype == dtype
        assert model.model.diffusion_model.out[2].weight.dtype == dtype
        assert next(model.cond_stage_model.parameters()).dtype == dtype
        assert model.first_stage_model.decoder.conv_out.weight.dtype == vae  # fp16 keeps the VAE in float32
        assert model.alphas_cumprod.dtype == torch.float32  # the schedule is never cast
        results = run(model)
        for mode, result in results.items():
            assert result.image.dtype == torch.float32 and result.latents.dtype == torch.float32
            assert torch.isfinite(result.image).all()
            for name in ("latents", "image"):
                error = relative_error(getattr(result, name), getattr(reference[mode], name))
                seed_gap = relative_error(getattr(other_seed[mode], name), getattr(reference[mode], name))
                assert 0 < error < rtol, (precision, mode, name, error)
                assert error < 0.1 * seed_gap, (precision, mode, name, error, seed_gap)


def test_empty_prompt_is_encoded_once_per_device_and_dtype(workdir):
    teacher = load_teacher(teacher_paths(workdir / "logs")["low_pass"]).eval()
    prompts = []
    encode = teacher.cond_stage_model.encode
    teacher.cond_stage_model.encode = lambda text: prompts.append(list(text)) or encode(text)
    context = teacher.get_learned_conditioning(["a cat", "a dog"])
    cond = {"c_crossattn": [context], "c_concat": [torch.zeros(2, 4, 16, 16)]}
    uncond = [teacher.unconditional_conditioning(cond) for _ in range(3)]
    assert prompts == [["a cat", "a dog"], [""]]
    fresh = encode([""])
    assert all(torch.equal(u["c_crossattn"][0], fresh.expand_as(context)) for u in uncond)
    prepare_for_inference(teacher, "cpu", "bf16")
    again = teacher.unconditional_conditioning({**cond, "c_crossattn": [context.bfloat16()]})
    assert prompts[-1] == [""] and len(prompts) == 3  # the dtype changed: encoded once more
    assert again["c_crossattn"][0].dtype == torch.bfloat16
    teacher.unconditional_conditioning(cond)
    assert len(prompts) == 3


def test_delta_file_is_small_and_rebuilds_the_full_student_and_teacher_bit_for_bit(distilled, workdir, delta,
                                                                                  tmp_path, capsys):
    base, delta_path, full_path = delta.base, delta.student, student_file(distilled)
    assert delta_path.stat().st_size < 0.5 * full_path.stat().st_size
    tensors, metadata = load_checkpoint(delta_path)
    full, full_metadata = load_checkpoint(full_path)
    assert set(tensors) < set(full) and all(k.startswith(CONTROL_PREFIX) for k in tensors)
    assert metadata["fcdiffusion.delta.base"] == "v2-1_tiny_base.ckpt"
    assert len(metadata["fcdiffusion.delta.base_sha256"]) == 64
    assert all(metadata[k] == v for k, v in full_metadata.items())  # it describes itself as the full file does
    rebuilt = load_student(delta_path, base=base).state_dict()
    assert rebuilt.keys() == full.keys() and all(torch.equal(rebuilt[k], full[k]) for k in full)

    teacher_path = teacher_paths(workdir / "logs")["high_pass"]
    teacher_delta = tmp_path / "high_pass_delta.safetensors"
    assert export_delta.main([str(teacher_path), str(teacher_delta), "--base", base]) == 0
    assert "wrote" in capsys.readouterr().out
    teacher_full, _ = load_checkpoint(teacher_path)
    assert set(load_checkpoint(teacher_delta)[0]) == {k for k in teacher_full if k.startswith(CONTROL_PREFIX)}
    rebuilt = load_model(teacher_delta, base=base)
    assert rebuilt.modes == ("high_pass",)
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in teacher_full.items())

    with pytest.raises(FileNotFoundError, match="delta file over v2-1_tiny_base.ckpt: .* --base PATH"):
        load_student(delta_path)
    other = {k: v.clone() for k, v in load_checkpoint(base)[0].items()}
    other["first_stage_model.decoder.conv_out.bias"] += 1
    save_state_dict(other, tmp_path / "other_base.ckpt")
    with pytest.raises(CheckpointMismatchError, match="another file"):
        load_student(delta_path, base=tmp_path / "other_base.ckpt")
    assert export_delta.main([str(full_path), str(tmp_path / "x.safetensors"), "--base",
                              str(tmp_path / "other_base.ckpt")]) == 1
    assert "not trained from this base" in capsys.readouterr().err


def test_translation_script_runs_a_delta_file_in_bf16(delta, workdir, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(workdir / "photos" / "coffee.png", photos)
    spec = importlib.util.spec_from_file_location("test_distillation_script", ROOT / "test_distillation.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "out"
    assert script.main(["--input_dir", str(photos), "--student", str(delta.student), "--base", delta.base,
                        "--precision", "bf16", "--mode", "low_pass", "--resolution", "64", "--out_dir", str(out),
                        "--prompt", "a watercolor painting"]) == 0
    assert (out / "coffee_low_pass.png").is_file() and (out / "coffee_grid.png").is_file()


@pytest.fixture(scope="module")
def sd_distillers() -> dict[str, FrequencyDistiller]:
    """The SD 2.1-base distiller on the meta device with float32 and with bf16 teachers."""
    config = teacher_model_config(load_config(SD_DISTILL_CONFIG))
    return {dtype: FrequencyDistiller(config, student={"trainable": ["control_net"]},
                                      distill={"teacher_dtype": dtype}) for dtype in ("fp32", "bf16")}


def test_teacher_dtype_bf16_halves_the_teachers_bytes_at_sd_size(sd_distillers):
    fp32, bf16 = (sd_distillers[d].parameter_counts() for d in ("fp32", "bf16"))
    assert 0.5 <= bf16["teacher_bytes"] / fp32["teacher_bytes"] < 0.5005  # float32 schedule buffers remain
    assert fp32["resident"] == bf16["resident"] and fp32["independent_bytes"] == bf16["independent_bytes"]
    assert fp32["resident_bytes"] < 0.4 * fp32["independent_bytes"]
    distiller = sd_distillers["bf16"]
    student = distiller.student
    trained = {id(p) for p in student.trainable_parameters()}
    assert all(p.dtype == torch.float32 for p in student.trainable_parameters())
    assert all(p.dtype == torch.bfloat16 for p in student.parameters() if id(p) not in trained)
    assert all(p.dtype == torch.bfloat16 for t in distiller.teachers.values() for p in t.parameters())
    teacher = distiller.teachers["low_pass"]
    assert teacher.model.diffusion_model.out[2].weight is student.model.diffusion_model.out[2].weight
    assert teacher.alphas_cumprod.dtype == torch.float32


def test_sd_delta_files_are_a_small_fraction_of_the_full_files(sd_distillers):
    sizes = weight_file_bytes(sd_distillers["fp32"])
    assert sizes["student_full_bytes"] > 6e9  # ~1.7B float32 parameters
    assert sizes["student_delta_bytes"] < 0.25 * sizes["student_full_bytes"]
    assert sizes["teacher_delta_bytes"] < sizes["student_delta_bytes"]  # the student adds its mode embedding


def test_distiller_trains_its_float32_student_beside_bf16_teachers(workdir, model_config, distill_config, delta,
                                                                   tmp_path):
    paths = teacher_paths(workdir / "logs")
    modes = ["mid_pass", "high_pass"]
    distill = {**OmegaConf.to_container(distill_config.distill), "objective": "progressive", "student_steps": 4,
               "teacher_substeps": 1}
    losses = {}
    for dtype in ("fp32", "bf16"):
        distiller = FrequencyDistiller(model_config, {m: paths[m] for m in modes}, paths["mid_pass"],
                                       {"trainable": ["control_net"]}, {**distill, "teacher_dtype": dtype})
        torch.manual_seed(0)
        z = torch.randn(1, 4, 16, 16)
        context = distiller.student.get_learned_conditioning(["a cat"])
        torch.manual_seed(1)
        loss, _ = distiller.distillation_loss(z, context, modes, torch.tensor([0, 3]),
                                              torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2)))
        loss.backward()
        grads = [p.grad for p in distiller.student.trainable_parameters()]
        assert all(g is not None and g.dtype == torch.float32 for g in grads) and any(g.abs().sum() > 0 for g in grads)
        losses[dtype] = loss.item()
    assert losses["bf16"] != losses["fp32"] and abs(losses["bf16"] / losses["fp32"] - 1) < 0.1, losses
    # Resuming from a student saved with its bf16 frozen base still shares that base with the teachers.
    save_state_dict(distiller.student.state_dict(), tmp_path / "student.safetensors")
    resumed = FrequencyDistiller(model_config, {m: paths[m] for m in modes}, tmp_path / "student.safetensors",
                                 {"trainable": ["control_net"]}, {**distill, "teacher_dtype": "bf16"})
    for model in (distiller, resumed):
        weight, teacher = model.student.model.diffusion_model.out[2].weight, model.teachers["high_pass"]
        assert weight.dtype == torch.bfloat16 and weight is teacher.model.diffusion_model.out[2].weight
    assert resumed.parameter_counts()["resident_bytes"] == distiller.parameter_counts()["resident_bytes"]
    # Its full file stores the bf16 base it learned against; its delta over the float32 base rebuilds it exactly.
    distiller.export_student(tmp_path / "bf16_student.safetensors")
    assert export_delta.main([str(tmp_path / "bf16_student.safetensors"), str(tmp_path / "bf16_delta.safetensors"),
                              "--base", delta.base]) == 0
    full = load_student(tmp_path / "bf16_student.safetensors").state_dict()
    rebuilt = load_student(tmp_path / "bf16_delta.safetensors", base=delta.base).state_dict()
    assert all(v.dtype == torch.float32 for v in rebuilt.values() if v.is_floating_point())
    assert rebuilt.keys() == full.keys() and all(torch.equal(rebuilt[k], full[k]) for k in full)


def test_tables_show_peak_memory_floor_and_bytes():
    run = {"teacher_4_cfg_s": 2.0, "student_1_s": 0.2, "student_2_s": 0.3, "student_4_s": 0.5, "speedup_4": 4.0,
           "floor": {"text_encoder_s": 0.01, "vae_encode_s": 0.05, "vae_decode_s": 0.08, "network_s": 0.04,
                     "floor_1_s": 0.18, "floor_2_s": 0.22, "floor_4_s": 0.3, "end_to_end_over_floor_1": 1.11,
                     "end_to_end_over_floor_2": 1.36, "end_to_end_over_floor_4": 1.67}}
    for name in ("teacher_4_cfg", "student_1", "student_2", "student_4"):
        run.update({f"{name}_min_s": run[f"{name}_s"], f"{name}_median_s": run[f"{name}_s"],
                    f"{name}_peak_bytes": 3.5e9})
    results = {"hardware": {"device": "GPU", "torch": "2"}, "precision": {"precision": "fp16", "compile": True},
               "speed": {"sd21_base_512px": run},
               "memory": {"distiller_params": 3.2e9, "five_full_models_params": 8.4e9, "ratio": 0.38,
                          "distiller_bytes": 12.7e9, "distiller_bytes_teacher_bf16": 7.1e9,
                          "five_full_models_bytes": 33.6e9, "bytes_ratio": 0.38, "bytes_ratio_teacher_bf16": 0.21,
                          "teacher_bytes": 11.2e9, "teacher_bytes_bf16": 5.6e9,
                          "files": {"student_full_bytes": 6.7e9, "student_delta_bytes": 1.5e9,
                                    "teacher_full_bytes": 6.7e9, "teacher_delta_bytes": 1.5e9}}}
    tables = format_tables(results, 4)
    assert "fp16 compiled" in tables and "| sd21_base_512px | 3.50 (2.000 / 2.000 s)" in tables
    assert "| sd21_base_512px | 0.010 | 0.050 | 0.080 | 0.040 | 0.180 (1.11x)" in tables
    assert "7.10 GB with teacher_dtype bf16" in tables and "1.500 GB delta (22.4%)" in tables
