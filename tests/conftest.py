"""Session fixtures: the tiny stand-ins for the downloaded weights and a small photo dataset, built once."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

TINY_CONFIG = "configs/model_config_tiny.yaml"
DEMO_PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]


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
    from fcdiffusion.demo_data import export_demo_dataset
    from fcdiffusion.tiny_base import build_tiny_base

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


def tiny_model(files: SimpleNamespace, *overrides: str, ckpt: Path | None = None):
    """The tiny FCDiffusion teacher, loaded strictly from `ckpt` (default: the init checkpoint)."""
    from omegaconf import OmegaConf

    from ldm.checkpoint import load_weights
    from ldm.util import instantiate_from_config, load_config

    config = load_config(TINY_CONFIG, [*files.overrides, *overrides])
    model = instantiate_from_config(OmegaConf.to_container(config.model, resolve=True))
    load_weights(model, ckpt or files.init)
    return model
