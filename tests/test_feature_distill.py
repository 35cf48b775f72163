"""Feature distillation: per-block feature MSE and cross-attention KL against the teachers, staged weights."""
from __future__ import annotations

import pytest
import torch

from fcdiffusion.core.student import student_config
from fcdiffusion.core.weights import build_on_meta
from fcdiffusion.train.distiller import DistillOptions, FrequencyDistiller
from fcdiffusion.train.feature_distill import FeatureTap, feature_blocks, transformer_layers
from ldm.modules.attention import BasicTransformerBlock
from ldm.modules.diffusionmodules.openaimodel import ResBlock
from tests.helpers import teacher_paths


@pytest.fixture(scope="module")
def terms(model_config) -> dict[str, float]:
    """Every kind of feature term on the tiny architecture: decoder and control-net blocks, the control net's middle
    block, and the cross-attention maps of the first decoder and control-net blocks that have a transformer."""
    blocks = feature_blocks(build_on_meta(student_config(model_config)))
    attention = [name for name, block in blocks.items() if transformer_layers(block)]
    first = {kind: next(n for n in attention if n.startswith(kind)) for kind in ("unet_out", "control_in")}
    return {"unet_out1": 1.0, "unet_out3": 0.5, "control_in1": 1.0, "control_mid": 2.0,
            f"attn_{first['unet_out']}": 0.3, f"attn_{first['control_in']}": 0.7}


@pytest.fixture(scope="module")
def distiller(workdir, model_config, distill_config, terms):
    """A distiller whose student starts as the mid_pass teacher, weighing every kind of feature term."""
    paths = teacher_paths(workdir / "logs")
    return FrequencyDistiller(model_config, paths, paths["mid_pass"], {"trainable": ["control_net"]},
                              {**dict(distill_config.distill), "objective": "progressive", "student_steps": 4,
                               "feature_weights": terms}).eval()


def inputs(distiller):
    torch.manual_seed(0)
    size = distiller.student.image_size
    z = torch.randn(2, 4, size, size)
    context = distiller.student.get_learned_conditioning(["a cat", "a red car"])
    noise = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(1))
    return z, context, torch.tensor([1, 3]), noise


def test_feature_terms_are_zero_for_identical_student_and_teacher_and_positive_otherwise(distiller, terms):
    z, context, steps, noise = inputs(distiller)
    # The student is the mid_pass teacher (zero mode embedding): on mid_pass every feature is the teacher's.
    loss, logs = distiller.distillation_loss(z, context, ["mid_pass"], steps, noise)
    assert all(logs[f"train/feat_{name}"] == 0 for name in terms), logs
    expected = logs["train/loss_distill"] + sum(w * logs[f"train/feat_{n}"] for n, w in terms.items())
    torch.testing.assert_close(loss.detach(), expected)

    control = distiller.student.control_model
    saved = {k: v.clone() for k, v in control.state_dict().items()}
    checkpointed = [m for m in distiller.student.modules() if isinstance(m, (ResBlock, BasicTransformerBlock))]
    assert checkpointed and not any(m.use_checkpoint for m in checkpointed)  # the tiny config's
    try:
        with torch.no_grad():
            generator = torch.Generator().manual_seed(2)
            for p in control.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        loss, logs = distiller.distillation_loss(z, context, ["mid_pass"], steps, noise)
        assert all(logs[f"train/feat_{name}"] > 0 for name in terms), logs
        expected = logs["train/loss_distill"] + sum(w * logs[f"train/feat_{n}"] for n, w in terms.items())
        torch.testing.assert_close(loss.detach(), expected)
        # The terms carry gradients to the control net through the hooks (here without the distillation term),
        # also with gradient checkpointing on, as SD's config has it.
        distiller.options.distill_weight = 0.0
        for module in checkpointed:
            module.use_checkpoint = True
        loss, _ = distiller.distillation_loss(z, context, ["mid_pass"], steps, noise)
        loss.backward()
        assert control.input_blocks[1][0].in_layers[2].weight.grad.abs().sum() > 0
    finally:
        for module in checkpointed:
            module.use_checkpoint = False
        distiller.options.distill_weight = 1.0
        control.load_state_dict(saved)
        distiller.student.zero_grad(set_to_none=True)


def test_feature_names_are_checked_against_the_architecture(distiller):
    student = distiller.student
    with pytest.raises(ValueError, match="no block 'unet_out9'"):
        FeatureTap(student, ["unet_out9"])
    with pytest.raises(ValueError, match="no cross-attention"):
        FeatureTap(student, ["attn_control_in0"])  # the first input block is a convolution
    with pytest.raises(ValueError, match="unknown feature term 'decoder'"):
        DistillOptions(feature_weights={"decoder": 1.0})
    with pytest.raises(ValueError, match="increasing steps"):
        DistillOptions(loss_stages=[[5, {"distill": 1.0}], [5, {"distill": 0.5}]])
    # The hooks are installed only while a loss records: none are left behind.
    assert not any(m._forward_hooks for m in student.modules())


def test_loss_stages_replace_the_weights_from_their_first_step():
    options = DistillOptions(control_weight=0.2, feature_weights={"unet_out1": 1.0},
                             loss_stages=[[0, {"distill": 0.1, "unet_out1": 2.0}],
                                          [100, {"unet_out1": 0.0, "control_mid": 0.5}]])
    assert options.feature_names() == ["unet_out1", "control_mid"]
    assert options.loss_weights(0) == {"distill": 0.1, "denoise": 0.0, "control": 0.2, "unet_out1": 2.0,
                                       "control_mid": 0.0}
    assert options.loss_weights(99) == options.loss_weights(0)
    assert options.loss_weights(100) == {"distill": 1.0, "denoise": 0.0, "control": 0.2, "unet_out1": 0.0,
                                         "control_mid": 0.5}
    assert DistillOptions().loss_weights(7) == {"distill": 1.0, "denoise": 0.0, "control": 0.0}  # off by default
