"""Session fixtures: the tiny stand-ins for the downloaded weights, random tiny teachers, a distilled student."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import (
    DEMO_PHOTOS,
    ROOT,
    TINY_CONFIG,
    TINY_DISTILL_CONFIG,
    distill_args,
    write_photos,
    write_random_teachers,
)


@pytest.fixture(scope="session", autouse=True)
def in_repo_root():
    """Configs name files relative to the repository root (e.g. the tiny open_clip architecture)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        yield


@pytest.fixture(scope="session")
def reference() -> dict:
    """The reference implementation's tensors (weights, inputs, outputs) from tests/fixtures."""
    from tests.reference import tensors

    return tensors()


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> SimpleNamespace:
    """Tiny SD checkpoint, text tower, FCDiffusion init checkpoint and a 4-photo training index in a temp dir."""
    import tool_add_control_sd21
    import training_data_prepare
    from fcdiffusion.train.demo_data import export_demo_dataset
    from fcdiffusion.train.tiny_base import build_tiny_base

    root = tmp_path_factory.mktemp("tiny")
    files = SimpleNamespace(root=root, sd=root / "v2-1_tiny.ckpt", clip=root / "open_clip_tiny.bin",
                            init=root / "fcdiffusion_init_tiny.ckpt", photos=root / "photos",
                            data=root / "training_data.json")
    build_tiny_base(files.sd, files.clip)
    export_demo_dataset(files.photos, names=DEMO_PHOTOS)
    assert training_data_prepare.main(["--data_root", str(files.photos), "--output", str(files.data)]) == 0
    assert tool_add_control_sd21.main([str(files.sd), str(files.init), "--config", TINY_CONFIG]) == 0
    files.overrides = [f"model.params.cond_stage_config.params.version={files.clip}"]
    return files


@pytest.fixture(scope="session")
def distill_config():
    from ldm.util import load_config

    return load_config(TINY_DISTILL_CONFIG)


@pytest.fixture(scope="session")
def model_config(distill_config) -> dict:
    """The tiny teachers' `{target, params}`."""
    from fcdiffusion.core.weights import teacher_model_config

    return teacher_model_config(distill_config)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory, model_config) -> Path:
    """Random tiny teachers under logs/fcdiffusion_<mode>_checkpoint/last.ckpt, photos with prompts, a data index."""
    root = tmp_path_factory.mktemp("distill")
    write_random_teachers(root / "logs", model_config)
    write_photos(root / "photos", root / "data.json")
    return root


@pytest.fixture(scope="session")
def distilled(workdir) -> Path:
    """A two-step distillation of a student for 1, 2 and 3 steps (image log at step 2, teacher samples in it); its
    logdir."""
    import fcdiffusion_distill

    logdir = workdir / "run"
    args = distill_args(workdir, logdir, 2, "--log_images_every", "2", "distill.log_teacher_steps=2",
                        "--student_steps", "1", "2", "3")
    assert fcdiffusion_distill.main(args) == 0
    return logdir


@pytest.fixture(scope="session")
def clip_file(tmp_path_factory) -> Path:
    """A random tiny open_clip model (both towers) saved as an open_clip `.bin` state dict, its image-text cosines
    positive (so that CLIP scores are not all clamped to 0)."""
    import open_clip
    import torch

    from ldm.checkpoint import save_state_dict
    from ldm.modules.encoders.modules import register_open_clip_config
    from tests.helpers import TINY_CLIP_ARCH, TINY_CLIP_CONFIG

    torch.manual_seed(0)
    register_open_clip_config(TINY_CLIP_ARCH, TINY_CLIP_CONFIG)
    model = open_clip.create_model(TINY_CLIP_ARCH, pretrained=None)
    with torch.no_grad():  # random towers put every image-text cosine below 0, which CLIPScore clamps to 0: flip it
        model.text_projection.neg_()
    path = tmp_path_factory.mktemp("clip") / "open_clip_pytorch_model.bin"
    save_state_dict(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def dino_folder(tmp_path_factory) -> Path:
    """A random small ViT in the transformers layout of facebook/dino-vitb8 (`save_pretrained`)."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       patch_size=8, image_size=224)
    folder = tmp_path_factory.mktemp("dino") / "dino-vitb8"
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def alexnet_file(tmp_path_factory) -> Path:
    """torchvision's AlexNet state dict with random weights, saved as torchvision's download is (LPIPS backbone)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "alexnet-owt-7be5be79.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def clean_inception_file(tmp_path_factory) -> Path:
    """A random stand-in for clean-fid's TorchScript Inception (`inception-2015-12-05.pt`): a small convolutional net
    with the interface clean-fid's `InceptionV3W` uses (`layers` maps (B, 3, 299, 299) normalised pixels to
    (B, 2048, 1, 1) features; `forward(x, return_features)`), scripted and saved under clean-fid's file name."""
    import torch

    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Conv2d(3, 16, 7, stride=4), torch.nn.ReLU(), torch.nn.Conv2d(16, 64, 3, stride=2),
                torch.nn.ReLU(), torch.nn.Conv2d(64, 2048, 1), torch.nn.AdaptiveAvgPool2d(1))

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return self.layers(x)

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "inception-2015-12-05.pt"
    torch.jit.script(StandIn().eval()).save(str(path))
    return path
