"""Config-driven construction and small helpers shared across the project.

`instantiate_from_config` is the latent-diffusion convention: a config node with a dotted `target:` and
optional `params:` builds that object, so SD 2.x YAML files work unchanged.
"""
from __future__ import annotations

import copy
import importlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch


def get_obj_from_str(path: str) -> Any:
    """Import `package.module.Name` and return `Name`."""
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"target '{path}' is not a dotted path such as 'ldm.models.autoencoder.AutoencoderKL'")
    return getattr(importlib.import_module(module), name)


def instantiate_from_config(config: Mapping[str, Any], **overrides: Any) -> Any:
    """Build `config.target(**config.params, **overrides)`."""
    if "target" not in config:
        raise KeyError(f"expected a config node with a 'target' key, got keys {sorted(config)}")
    params = dict(config.get("params") or {})
    params.update(overrides)
    return get_obj_from_str(config["target"])(**params)


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements, counting each shared tensor once."""
    seen: dict[int, int] = {}
    for p in module.parameters():
        if not trainable_only or p.requires_grad:
            seen[id(p)] = p.numel()
    return sum(seen.values())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    A crash mid-write leaves the old file (or none), never a truncated one.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None):
    """Read a YAML config with OmegaConf and apply `key.sub=value` command-line overrides."""
    from omegaconf import OmegaConf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    config = OmegaConf.load(path)
    if overrides:
        bad = [o for o in overrides if "=" not in o or o.startswith("-")]
        if bad:
            raise ValueError(f"config overrides must look like key.sub=value, got {bad}")
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(overrides))
    return config


def without_text_encoder_file(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a latent-diffusion `{target, params}` config whose text encoder reads no weights file.

    For building a model whose full checkpoint carries the text encoder's tensors (or on the meta device, or
    with random weights): `cond_stage_config.params.version` becomes None.
    """
    config = copy.deepcopy(dict(config))
    cond_params = (config.get("params") or {}).get("cond_stage_config", {}).get("params")
    if cond_params is not None and "version" in cond_params:
        cond_params["version"] = None
    return config
