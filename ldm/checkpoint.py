"""The one place that reads and writes weight files.

Reads `.ckpt`/`.pt`/`.pth` (plain state dicts or Lightning dicts holding `state_dict`) and `.safetensors`, with
the string metadata a file may carry (safetensors' header metadata, or a `metadata` entry of a `.ckpt` dict).
Loading is strict: any missing, unexpected or mis-shaped key raises `CheckpointMismatchError`, with the keys
grouped by prefix so a wrong file is recognisable at a glance, never a silent partial load.
"""
from __future__ import annotations

import logging
import os
import pickle
from collections import Counter
from collections.abc import Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm.util import atomic_path

log = logging.getLogger(__name__)


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not match the model it is loaded into."""


def load_checkpoint(path: str | os.PathLike, hint: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict on the CPU, metadata) of the file at `path`; `hint` is appended to the error when it is missing."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}" + (f"\n{hint}" if hint else ""))
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(path, device="cpu"), metadata
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Lightning checkpoints may pickle hyper-parameters (OmegaConf nodes); the file is the user's own.
        log.warning("%s holds pickled objects beyond tensors; loading it with weights_only=False", path)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    metadata = {}
    if isinstance(obj, Mapping) and "state_dict" in obj:
        metadata = dict(obj.get("metadata") or {})
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return dict(obj), metadata


def load_state_dict(path: str | os.PathLike, hint: str = "") -> dict[str, torch.Tensor]:
    """The state dict of the file at `path` on the CPU (see `load_checkpoint`)."""
    return load_checkpoint(path, hint)[0]


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Write a state dict atomically: safetensors for `.safetensors`, `{'state_dict': ..., 'metadata': ...}` for
    `.ckpt` (SD's layout), a plain dict otherwise (`.bin`/`.pt`, open_clip's layout, which has no metadata)."""
    path = os.fspath(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    metadata = dict(metadata or {})
    with atomic_path(path) as tmp:
        if path.endswith(".safetensors"):
            save_file(tensors, tmp, metadata=metadata or None)
        elif path.endswith(".ckpt"):
            torch.save({"state_dict": tensors, **({"metadata": metadata} if metadata else {})}, tmp)
        elif metadata:
            raise ValueError(f"{path}: only .safetensors and .ckpt files carry metadata")
        else:
            torch.save(tensors, tmp)


def group_keys(keys: Iterable[str], depth: int = 2) -> str:
    """Summarise keys as 'prefix (count)' lines, prefix = first `depth` dotted components."""
    counts = Counter(".".join(k.split(".")[:depth]) for k in keys)
    return "\n".join(f"    {prefix}.* ({n})" for prefix, n in sorted(counts.items()))


def check_state_dict(
    model_state: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Raise `CheckpointMismatchError` unless `state_dict` has exactly the keys and shapes of `model_state`."""
    missing = sorted(set(model_state) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(model_state))
    mis_shaped = sorted(
        k for k in set(model_state) & set(state_dict) if tuple(model_state[k].shape) != tuple(state_dict[k].shape)
    )
    if not (missing or unexpected or mis_shaped):
        return
    parts = [f"{source} does not match the model:"]
    if missing:
        parts.append(f"  {len(missing)} missing keys (in the model, not in the file):\n{group_keys(missing)}")
    if unexpected:
        parts.append(f"  {len(unexpected)} unexpected keys (in the file, not in the model):\n{group_keys(unexpected)}")
    if mis_shaped:
        lines = "\n".join(
            f"    {k}: model {tuple(model_state[k].shape)} vs file {tuple(state_dict[k].shape)}"
            for k in mis_shaped[:20]
        )
        more = f"\n    ... and {len(mis_shaped) - 20} more" if len(mis_shaped) > 20 else ""
        parts.append(f"  {len(mis_shaped)} keys with other shapes:\n{lines}{more}")
    raise CheckpointMismatchError("\n".join(parts))


def load_weights(
    model: torch.nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    strict: bool = True,
    hint: str = "",
) -> list[str]:
    """Load `source` (a path or a state dict) into `model`.

    With `strict` (the default) every key and shape must match. `strict=False` is for deliberate partial
    loads (for example a control net initialised from a UNet): it still rejects shape mismatches and returns
    the model keys that were not in the file, so callers can report them.
    """
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "state dict"
    state_dict = load_state_dict(source, hint) if isinstance(source, (str, os.PathLike)) else dict(source)
    model_state = model.state_dict()
    if strict:
        check_state_dict(model_state, state_dict, name)
    else:
        subset = {k: v for k, v in state_dict.items() if k in model_state}
        check_state_dict({k: model_state[k] for k in subset}, subset, name)
        state_dict = subset
    missing = sorted(set(model_state) - set(state_dict))
    model.load_state_dict(state_dict, strict=strict)
    return missing
