"""The one place that reads and writes weight files.

Reads `.ckpt`/`.pt`/`.pth` (plain state dicts or Lightning dicts holding `state_dict`) and `.safetensors`, with
the string metadata a file may carry (safetensors' header metadata, or a `metadata` entry of a `.ckpt` dict).
Loading is strict: any missing, unexpected or mis-shaped key raises `CheckpointMismatchError`, with the keys
grouped by prefix so a wrong file is recognisable at a glance, never a silent partial load. A file that is no
readable checkpoint (empty, truncated, text) raises `CheckpointReadError`, one with NaN/Inf values
`NonFiniteWeightsError`: both are `CheckpointMismatchError`s, so the scripts report them like any wrong file.
"""
from __future__ import annotations

import json
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
    """A checkpoint does not fit the model it is loaded into (keys, shapes), or cannot be used at all."""


class CheckpointReadError(CheckpointMismatchError):
    """A file that cannot be read as a checkpoint: empty, truncated or corrupt, or not a weights file at all.

    A `CheckpointMismatchError`, so every handler of wrong weight files reports it as well.
    """


class NonFiniteWeightsError(CheckpointMismatchError):
    """A checkpoint holding NaN or infinite values: training from it gives `loss=nan`, sampling gives noise."""


_HEAD_BYTES = 256
_ZIP_MAGIC, _ZIP_END = b"PK\x03\x04", b"PK\x05\x06"  # a zip's first entry; its end-of-central-directory record
_SAFETENSORS_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
FORMATS = {"zip": "a PyTorch checkpoint", "pickle": "a legacy PyTorch checkpoint", "safetensors": "a safetensors file"}


def _as_text(head: bytes) -> str | None:
    """`head` as text if it is printable UTF-8 (allowing a character cut at the end), else None."""
    for cut in range(4):
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return text if all(c.isprintable() or c in "\t\r\n" for c in text) else None
    return None


def _sniff(head: bytes) -> str:
    """What a file's first bytes say it is: 'zip' (PyTorch), 'pickle' (legacy PyTorch), 'safetensors', 'lfs' (a
    Git LFS pointer), 'text' or 'unknown'."""
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    # Before the pickle test: a header of 640 bytes, say, starts with the bytes of a pickle's protocol 2 opcode.
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= _SAFETENSORS_MAX_HEADER:
        return "safetensors"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head.startswith(b"version https://git-lfs"):
        return "lfs"
    return "text" if head and _as_text(head) is not None else "unknown"


def _truncated(path: str, size: int, kind: str) -> bool:
    """Whether the file's own structure says its end is missing: a zip without its end record, a safetensors file
    shorter than its header declares."""
    with open(path, "rb") as f:
        if kind == "zip":
            f.seek(max(0, size - 65_557))  # the end record (22 bytes) follows at most a 64 KiB comment
            return _ZIP_END not in f.read()
        if kind == "safetensors":
            header_size = int.from_bytes(f.read(8), "little")
            if 8 + header_size > size:
                return True
            try:
                header = json.loads(f.read(header_size))
                ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                return False
            return 8 + header_size + max(ends, default=0) > size
    return False


def _unreadable(path: str, size: int, kind: str, expected: tuple[str, ...], head: bytes,
                error: Exception | None = None) -> str:
    """The message of a `CheckpointReadError`: the file, its size, what it seems to be, the reader's complaint."""
    if size == 0:
        what = "the file is empty (an interrupted download or copy?)"
    elif kind == "lfs":
        what = "a Git LFS pointer, not the weights (fetch them with `git lfs pull`, or download the file itself)"
    elif kind == "text":
        first_line = next(iter(_as_text(head).strip().splitlines()), "")[:60]
        what = f"a text file, not a checkpoint (its first line: {first_line!r})"
    elif kind == "unknown":
        what = "not a checkpoint (neither a PyTorch nor a safetensors file)"
    elif kind not in expected:
        extension = ".safetensors" if kind == "safetensors" else ".ckpt"
        what = f"{FORMATS[kind]}, not {FORMATS[expected[0]]}: give it the {extension} extension"
    elif _truncated(path, size, kind):
        what = f"{FORMATS[kind]}, truncated (its end is missing: an interrupted download or copy?)"
    else:
        what = f"{FORMATS[kind]} that is truncated or corrupt"
    complaint = str(error).strip().splitlines()[0][:200] if error is not None and str(error).strip() else ""
    detail = f" [{type(error).__name__}: {complaint}]" if complaint else ""
    return f"cannot read checkpoint {path} ({size:,} bytes): {what}{detail}"


def _read_torch(path: str) -> object:
    """`torch.load` of `path`, tensors only unless the file pickles more."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Lightning checkpoints may pickle hyper-parameters (OmegaConf nodes); the file is the user's own.
        log.warning("%s holds pickled objects beyond tensors; loading it with weights_only=False", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def _read(path: str, kind: str) -> tuple[object, dict[str, str]]:
    """(what the file holds: a state dict unless it is no checkpoint, its metadata) of a file of format `kind`."""
    if kind == "safetensors":
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(path, device="cpu"), metadata
    obj = _read_torch(path)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        return obj["state_dict"], dict(obj.get("metadata") or {})
    return obj, {}


def load_checkpoint(path: str | os.PathLike, hint: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict on the CPU, metadata) of the file at `path`; `hint` is appended to the error when it is missing
    or unreadable.

    A file that cannot be read as a checkpoint raises `CheckpointReadError` saying what it seems to be (empty,
    truncated, a text file, ...) rather than the reader's own trace; NaN or infinite values raise
    `NonFiniteWeightsError` (`check_finite`).
    """
    path = os.fspath(path)
    suffix = f"\n{hint}" if hint else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}" + suffix)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    kind = _sniff(head)
    expected = ("safetensors",) if path.endswith(".safetensors") else ("zip", "pickle")
    if size == 0 or kind not in expected:
        raise CheckpointReadError(_unreadable(path, size, kind, expected, head) + suffix)
    try:
        obj, metadata = _read(path, kind)
    except MemoryError:
        raise
    except Exception as error:  # whatever the reader trips over in a damaged file (OSError, EOFError, ...)
        raise CheckpointReadError(_unreadable(path, size, kind, expected, head, error) + suffix) from error
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(f"cannot read checkpoint {path} ({size:,} bytes): {FORMATS[kind]} holding a "
                                  f"{type(obj).__name__}, not a state dict")
    state_dict = dict(obj)
    check_finite(state_dict, path)
    return state_dict, metadata


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a weights file without reading its tensors (the safetensors header, or a `.ckpt`'s
    `metadata` entry with its tensors memory-mapped); {} for a file that cannot be read so (`load_checkpoint` says
    why when it loads it)."""
    path = os.fspath(path)
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                return dict(f.metadata() or {})
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError:  # a Lightning checkpoint pickling more than tensors: the user's own file
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # missing, damaged, or an old format mmap cannot read
        return {}
    return dict(obj.get("metadata") or {}) if isinstance(obj, Mapping) else {}


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise `NonFiniteWeightsError` naming `source` and up to 5 keys if a floating tensor holds NaN or Inf."""
    bad = [k for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.is_meta and not torch.isfinite(v).all()]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteWeightsError(
            f"{source} holds NaN or infinite values in {len(bad)} tensors: {', '.join(bad[:5])}{more}; "
            "it is damaged (or saved from a diverged run): use an earlier or a freshly downloaded file")


def load_state_dict(path: str | os.PathLike, hint: str = "") -> dict[str, torch.Tensor]:
    """The state dict of the file at `path` on the CPU (see `load_checkpoint`)."""
    return load_checkpoint(path, hint)[0]


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Write a state dict atomically: safetensors for `.safetensors`, `{'state_dict': ..., 'metadata': ...}` for
    `.ckpt` (SD's layout), a plain dict otherwise (`.bin`/`.pt`, open_clip's layout, which has no metadata).

    The same tensors give the same bytes: torch.save writes to an open file, so its zip records are not named
    after the (random) temporary file.
    """
    path = os.fspath(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    metadata = dict(metadata or {})
    if metadata and not path.endswith((".safetensors", ".ckpt")):
        raise ValueError(f"{path}: only .safetensors and .ckpt files carry metadata")
    with atomic_path(path) as tmp:
        if path.endswith(".safetensors"):
            save_file(tensors, tmp, metadata=metadata or None)
        else:
            ckpt = {"state_dict": tensors, **({"metadata": metadata} if metadata else {})}
            with open(tmp, "wb") as f:
                torch.save(ckpt if path.endswith(".ckpt") else tensors, f)


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
