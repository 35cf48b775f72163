"""Config-driven construction and small helpers shared across the project.

`instantiate_from_config` is the latent-diffusion convention: a config node with a dotted `target:` and
optional `params:` builds that object, so SD 2.x YAML files work unchanged: the keys they carry for parts of SD's
code this codebase does not have are accepted in one place, `SD_ONLY_PARAMS`, and no constructor takes them.
"""
from __future__ import annotations

import copy
import importlib
import os
import re
import socket
import stat
import tempfile
import zlib
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


# Every optimizer's `foreach` argument where no fused kernel is used. On a CPU torch would pick the single-tensor
# loop: a Python round of several ops per parameter tensor, 15-18 ms of a quickstart training step. Its CPU foreach
# kernels run the same per-tensor ops from C++, so the weights come out bit-identical (tests/test_memory_options.py).
FOREACH = True
ANY_VALUE = object()  # an `SD_ONLY_PARAMS` entry whose value does not matter here

# Keys of SD 2.x YAML `params:` (configs/sd21_base.yaml mirrors SD's v2-inference.yaml) for parts of SD's code this
# codebase does not have: SD's own training loop and logging (Lightning's callbacks log, checkpoint and keep EMAs
# here), an EMA copy of the weights, a trainable text encoder. Per class (its subclasses included): key -> the one
# value that builds the model as this codebase does (another value is an error, not silently a different model),
# or ANY_VALUE. `instantiate_from_config` checks and drops them, so each constructor takes only what it uses.
SD_ONLY_PARAMS: dict[str, dict[str, Any]] = {
    "ldm.models.diffusion.ddpm.LatentDiffusion": {
        "monitor": ANY_VALUE,  # the metric of SD's checkpoint callback
        "log_every_t": ANY_VALUE,  # how often SD's sampler logged intermediate steps
        "num_timesteps_cond": 1,  # SD's shortened conditioning schedule, off in SD 2.x
        "use_ema": False,  # SD 2.1-base inference checkpoints hold no EMA weights
        "cond_stage_trainable": False,  # the text encoder stays frozen
    },
    "ldm.models.autoencoder.AutoencoderKL": {
        "monitor": ANY_VALUE,  # the metric of SD's checkpoint callback
        "colorize_nlabels": ANY_VALUE,  # SD's logging of segmentation-map inputs
        "ema_decay": None,  # no EMA copy of the autoencoder
        "learn_logvar": False,  # the loss's log-variance is not trained
    },
    "ldm.modules.diffusionmodules.openaimodel.UNetEncoder": {
        "image_size": ANY_VALUE,  # the UNet and the control net work at any latent size
    },
    "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder": {
        "device": ANY_VALUE,  # the tokens follow the weights, which move with the module
    },
}


def without_sd_only_params(target: type, params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` without the `SD_ONLY_PARAMS` of `target` and its base classes; a ValueError for such a key set to
    a value other than the one supported."""
    kept = dict(params)
    for cls in target.__mro__:
        for key, supported in SD_ONLY_PARAMS.get(f"{cls.__module__}.{cls.__qualname__}", {}).items():
            if key not in kept:
                continue
            value = kept.pop(key)
            if supported is not ANY_VALUE and value != supported:
                raise ValueError(f"{target.__name__}: {key}={value!r} is not supported (an SD option for code this "
                                 f"codebase does not have); leave it out or set {supported!r}")
    return kept


def instantiate_from_config(config: Mapping[str, Any], **overrides: Any) -> Any:
    """Build `config.target(**config.params, **overrides)`, less the target's `SD_ONLY_PARAMS`."""
    if "target" not in config:
        raise KeyError(f"expected a config node with a 'target' key, got keys {sorted(config)}")
    params = dict(config.get("params") or {})
    params.update(overrides)
    target = get_obj_from_str(config["target"])
    return target(**without_sd_only_params(target, params)) if isinstance(target, type) else target(**params)


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements, counting each shared tensor once."""
    seen: dict[int, int] = {}
    for p in module.parameters():
        if not trainable_only or p.requires_grad:
            seen[id(p)] = p.numel()
    return sum(seen.values())


def _umask() -> int:
    """The process's umask, read without changing it (Linux's /proc; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but not ours to signal
        pass
    return True


# Temp files of atomic writes: `.<name>.<host>-<pid>.<random>.tmp`, so a later write can tell which were left by a
# process of this machine that died mid-write (a kill never reaches the cleanup) and remove them.
_HOST_TAG = f"{zlib.crc32(socket.gethostname().encode()):08x}"
_TEMP_TAIL = re.compile(r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[a-z0-9_]+\.tmp")


def remove_stale_temp_files(path: str | os.PathLike) -> list[str]:
    """Remove the temp files that atomic writes of `path` by dead processes of this machine left; their paths.

    Those of live processes (writes in progress), of other machines (a shared disk) and of other targets stay.
    """
    path = os.path.abspath(os.fspath(path))
    directory, prefix = os.path.dirname(path), "." + os.path.basename(path) + "."
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = _TEMP_TAIL.fullmatch(entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
        if match is None or match["host"] != _HOST_TAG or _pid_alive(int(match["pid"])):
            continue
        try:
            os.remove(entry.path)
        except FileNotFoundError:  # another writer cleaned it first
            continue
        removed.append(entry.path)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    A crash mid-write leaves the old file (or none), never a truncated one; temp files that earlier writers of
    `path` left when killed are removed first. The file gets the mode a plain `open()` would give it: an existing
    file's own, else 0o666 less the umask (not mkstemp's 0o600).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temp_files(path)
    prefix = f".{os.path.basename(path)}.{_HOST_TAG}-{os.getpid()}."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
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
