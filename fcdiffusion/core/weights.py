"""Building FCDiffusion models and putting weights into them: meta-device builds, shared frozen tensors, strict
loading, and the metadata that makes a weights file describe itself.

A teacher's checkpoint and `student.safetensors` record what they are (`fcdiffusion.kind`), the modes they
serve (`fcdiffusion.modes`) and the config that rebuilds them (`fcdiffusion.config`), so `load_teacher` and
`load_student` need no config file. Files from before this metadata load with an explicit config.

A delta file (`export_delta`) holds only what a model adds to the SD 2.1-base checkpoint: the control net, and
for a student its mode embedding, LoRA adapters and any other trained tensor. It names the base file and records
its SHA-256 (`fcdiffusion.delta.*`); the loaders apply it over that base (`base=`), strictly: another base file
or a key either side lacks is an error.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from fcdiffusion.core.frequency import ControlMode
from fcdiffusion.core.model import FCDiffusion
from fcdiffusion.core.precision import cast_parameters, precision_dtype
from fcdiffusion.core.student import (
    DISTILLED_SCHEDULER,
    MODE_LABEL_KEY,
    STUDENT_TARGET,
    FCDiffusionStudent,
    student_config,
)
from ldm.checkpoint import CheckpointMismatchError, check_state_dict, load_checkpoint, read_metadata, save_state_dict
from ldm.models.diffusion.scheduler import max_steps
from ldm.util import instantiate_from_config, without_text_encoder_file

log = logging.getLogger(__name__)

STUDENT_PREFIX = "student."
CONTROL_PREFIX = "control_model."
DELTA_BASE, DELTA_BASE_SHA256 = "fcdiffusion.delta.base", "fcdiffusion.delta.base_sha256"
# Student files of the first distillation release (before self-describing weight files, loaded with --config) name
# the mode embedding `mode_embedding.weight`; it is the control net's `label_emb` now. Kept so those files load.
LEGACY_STUDENT_KEYS = {"mode_embedding.weight": MODE_LABEL_KEY}


class ModeMismatchError(ValueError):
    """A teacher checkpoint asked to serve a control mode other than the one it was trained for."""


# ---- building ---------------------------------------------------------------------------------------------------
def build_on_meta(config: Mapping[str, Any]) -> nn.Module:
    """Instantiate a `{target, params}` model config on the meta device (no memory, no random init).

    The text encoder's own weights file is not read: full checkpoints carry its tensors.
    """
    with torch.device("meta"):
        return instantiate_from_config(without_text_encoder_file(config))


def teacher_model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The teachers' `{target, params}` of a distillation config: the `model:` node of the file
    `config.model_config`, with `config.model` merged in."""
    if not os.path.isfile(config["model_config"]):
        raise FileNotFoundError(f"model config not found: {config['model_config']}")
    merged = OmegaConf.merge(OmegaConf.load(config["model_config"]).model, config.get("model") or {})
    return OmegaConf.to_container(merged, resolve=True)


def distilled_student_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The student's `{target, params}` a distillation config describes (teachers' architecture, `student:`
    options, `distill.student_steps`, `distill.guidance_scale` and `distill.guidance_range`)."""
    options = {k: v for k, v in OmegaConf.to_container(OmegaConf.create(dict(config["student"]))).items()
               if k != "init"}
    distill = OmegaConf.to_container(OmegaConf.create(dict(config["distill"])), resolve=True)
    return student_config(teacher_model_config(config), **options, student_steps=distill["student_steps"],
                          guidance_scale=distill.get("guidance_scale"), guidance_range=distill.get("guidance_range"))


# ---- sharing tensors between models -----------------------------------------------------------------------------
def trained_keys(model: nn.Module) -> set[str]:
    """Names of the parameters `model.trainable_parameters()` returns: what that model learns (by structure)."""
    trained = {id(p) for p in model.trainable_parameters()}
    return {name for name, p in model.named_parameters() if id(p) in trained}


def frozen_keys(model: nn.Module) -> set[str]:
    """State-dict keys of `model` that it does not train: the candidates for sharing with other models."""
    return set(model.state_dict(keep_vars=True)) - trained_keys(model)


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Make `tensor` (the object itself, so it can be shared) the parameter or buffer `key` of `model`."""
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    current = getattr(owner, attr)
    if isinstance(current, nn.Parameter) and not isinstance(tensor, nn.Parameter):
        tensor = nn.Parameter(tensor, requires_grad=current.requires_grad)
    setattr(owner, attr, tensor)


class WeightAdopter:
    """Puts checkpoint tensors into meta-built models, holding one copy of each frozen tensor they have in common.

    For every key a model does not train (`frozen_keys`), the first model to adopt it provides the one copy (a
    frozen Parameter or buffer); later models reuse that object when shape and dtype agree and the values are
    equal (always, on the meta device, where there are no values to compare). Otherwise they keep their own
    tensor; differing values are counted in `mismatched`.
    """

    def __init__(self) -> None:
        self.canonical: dict[str, torch.Tensor] = {}
        self.mismatched: Counter[str] = Counter()

    def _shared(self, key: str, value: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
        canonical = self.canonical.get(key)
        if canonical is None:
            if isinstance(template, nn.Parameter) and not isinstance(value, nn.Parameter):
                value = nn.Parameter(value, requires_grad=False)
            self.canonical[key] = value.requires_grad_(False)
            return value
        if canonical.shape != value.shape or canonical.dtype != value.dtype:
            return value
        if value.is_meta or canonical.is_meta or torch.equal(canonical, value):
            return canonical
        self.mismatched[key] += 1
        return value

    def adopt(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
              expected: Iterable[str] | None = None) -> None:
        """Strictly check `state_dict` against `model` (or its keys `expected`), then assign its tensors."""
        current = model.state_dict(keep_vars=True)
        expected = set(current) if expected is None else set(expected)
        check_state_dict({k: current[k] for k in expected}, state_dict, source)
        frozen = frozen_keys(model)
        for key, value in state_dict.items():
            value = value.to(dtype=current[key].dtype)
            if key in frozen:
                value = self._shared(key, value, current[key])
            _set_tensor(model, key, value)

    def share_structure(self, model: nn.Module) -> None:
        """The meta-device path: no weights, share every frozen tensor by name, shape and dtype alone."""
        state, frozen = model.state_dict(keep_vars=True), frozen_keys(model)
        self.adopt(model, {k: state[k] for k in frozen}, "meta build", expected=frozen)


def finish_loading(model: nn.Module, name: str) -> None:
    """Raise if a tensor of `model` is still on the meta device (a key no file provided); else sync `model.device`.

    A Lightning module built under the meta device believes it lives there; the no-op `.to()` corrects that.
    """
    tensors = [*model.named_parameters(), *model.named_buffers()]
    left = [n for n, t in tensors if t.is_meta]
    if left:
        raise RuntimeError(f"{name}: {len(left)} tensors got no weights, e.g. {left[:5]}")
    model.to(tensors[0][1].device)


# ---- what a file says about itself -----------------------------------------------------------------------------
def recorded(metadata: Mapping[str, str], name: str) -> Any:
    """The JSON value a weights file records as `fcdiffusion.<name>`, or None."""
    value = metadata.get(f"fcdiffusion.{name}")
    return None if value is None else json.loads(value)


class KindMismatchError(ValueError):
    """A weights file of another kind than asked for (a teacher given as the student, ...); `found` is the kind it
    holds, so that a script can name its own flag for that kind."""

    def __init__(self, message: str, found: str):
        super().__init__(message)
        self.found = found


def _check_kind(metadata: Mapping[str, str], kind: str, source: str) -> None:
    found = metadata.get("fcdiffusion.kind")
    if found is not None and found != kind:
        raise KindMismatchError(f"{source} holds an FCDiffusion {found}, not a {kind}", found)


def teacher_mode(metadata: Mapping[str, str], source: str, mode: str | None = None) -> str:
    """The control mode the teacher file `source` serves, checked against `mode` when one is asked for.

    A file that records its mode and was trained for another raises `ModeMismatchError` naming both; a file
    from before teachers recorded their mode is trusted for `mode` (with a warning), and needs one.
    """
    _check_kind(metadata, "teacher", source)
    modes = recorded(metadata, "modes")
    if modes:
        if mode is not None and ControlMode(mode) != modes[0]:
            raise ModeMismatchError(f"{source} is the {modes[0]} teacher (trained for control mode '{modes[0]}'); "
                                    f"it cannot serve control mode '{mode}'")
        return modes[0]
    if mode is None:
        raise ValueError(f"{source} records no control mode (a checkpoint from before teachers recorded theirs, "
                         f"or an untrained init checkpoint); name the mode it was trained for")
    log.warning("%s records no control mode; trusting that it is the %s teacher", source, mode)
    return ControlMode(mode)


ZERO_INITIALISED = tuple(f"control_model.{name}." for name in (
    "zero_convs_add", "zero_convs_mul", "middle_block_out_add", "middle_block_out_mul", "hint_add", "hint_mul"))


class UntrainedTeacherError(ValueError):
    """A teacher file whose control net has never trained (the init checkpoint of tool_add_control_sd21.py)."""


def check_trained_teacher(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise `UntrainedTeacherError` if the control net's zero-initialised output layers (`ZERO_INITIALISED`) are
    all exactly zero: such a control net adds nothing, so the "teacher" is plain SD and would teach nothing."""
    outputs = [v for k, v in state_dict.items() if k.startswith(ZERO_INITIALISED)]
    if outputs and not any(v.is_meta or v.any() for v in outputs):
        raise UntrainedTeacherError(
            f"{source} looks like an untrained init checkpoint (tool_add_control_sd21.py output): the output layers "
            "of its control net are all zero, so it would teach plain SD; train it with fcdiffusion_train.py first "
            "and pass the checkpoint training writes")


# Classes that weight files written before the layered package (0.2) name by their old module.
MOVED_TARGETS = {f"fcdiffusion.{old}": f"fcdiffusion.core.{old}" for old in (
    "model.FCDiffusion", "student.FCDiffusionStudent", "control_net.FreqControlNet",
    "controlled_unet.ControlledUnetModel")}


def upgrade_targets(config: Any) -> Any:
    """`config` with every `target:` that names a class by its old module (`MOVED_TARGETS`) renamed, so weight
    files and YAML configs from before the layered package still build."""
    if isinstance(config, Mapping):
        return {k: MOVED_TARGETS.get(v, v) if k == "target" and isinstance(v, str) else upgrade_targets(v)
                for k, v in config.items()}
    if isinstance(config, list):
        return [upgrade_targets(v) for v in config]
    return config


def _config(metadata: Mapping[str, str], config: Mapping[str, Any] | None, source: str) -> dict[str, Any]:
    """An explicit config wins; else the one the file records; else an error saying what to pass."""
    if config is not None:
        return upgrade_targets(dict(config))
    found = recorded(metadata, "config")
    if found is None:
        raise ValueError(f"{source} records no model config (written before weight files described themselves); "
                         f"pass the config it was trained with (--config)")
    return upgrade_targets(found)


def max_sampling_steps(config: Mapping[str, Any], spacing: str | None = None) -> int:
    """The most sampling steps the model a `{target, params}` config describes can take over its `timesteps`: a
    student on the spacing it records (`scheduler`), a teacher on `spacing` (default SD's uniform one)."""
    config = upgrade_targets(dict(config))
    params = config.get("params") or {}
    if config.get("target") == STUDENT_TARGET:
        spacing = (params.get("scheduler") or DISTILLED_SCHEDULER)["spacing"]
    return max_steps(spacing or "uniform", int(params.get("timesteps", 1000)))


def recorded_max_sampling_steps(path: str | os.PathLike, spacing: str | None = None) -> int | None:
    """`max_sampling_steps` of the model the weights file at `path` records (its tensors are not read), or None
    when it records no config (or cannot be read: the loader will say why)."""
    config = recorded(read_metadata(path), "config")
    return None if config is None else max_sampling_steps(config, spacing)


# ---- loading ------------------------------------------------------------------------------------------------------
def load_teacher(path: str | os.PathLike, mode: str | None = None, config: Mapping[str, Any] | None = None,
                 base: str | os.PathLike | None = None) -> FCDiffusion:
    """The teacher at `path`, loaded strictly and checked to be trained and the teacher of `mode` (if given).

    `config` (the teachers' `{target, params}`) is needed only for files that record none; `base` (the SD
    2.1-base checkpoint) only for delta files.
    """
    return _teacher(*read_weights(path, base), os.fspath(path), mode, config)


def _teacher(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str, mode: str | None,
             config: Mapping[str, Any] | None) -> FCDiffusion:
    check_trained_teacher(state_dict, source)
    mode = teacher_mode(metadata, source, mode)
    config = _config(metadata, config, source)
    config["params"] = {**config["params"], "control_mode": mode}
    model = build_on_meta(config)
    WeightAdopter().adopt(model, state_dict, source)
    finish_loading(model, source)
    return model


def student_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The student's own keys: a distiller checkpoint's `student.*` entries with the prefix dropped, else as is;
    keys of older student files renamed (`LEGACY_STUDENT_KEYS`)."""
    if state_dict and all(k.startswith(STUDENT_PREFIX) for k in state_dict):
        state_dict = {k[len(STUDENT_PREFIX):]: v for k, v in state_dict.items()}
    return {LEGACY_STUDENT_KEYS.get(k, k): v for k, v in state_dict.items()}


def adopt_student(student: FCDiffusionStudent, state_dict: Mapping[str, torch.Tensor], source: str,
                  adopter: WeightAdopter | None = None, allow_fcdiffusion: bool = False) -> None:
    """Load a student strictly from a student file (or distiller checkpoint).

    With `allow_fcdiffusion` (initialising a distillation) the student-only keys may be missing, as in an
    FCDiffusion checkpoint or a student trained without LoRA: those parameters keep their initialisation (zero
    mode embedding, zero LoRA update), so the student begins as exactly the loaded network. Any other key
    difference raises `CheckpointMismatchError`.
    """
    state_dict = student_state_dict(state_dict)
    keys = set(student.state_dict())
    if allow_fcdiffusion:
        student.reset_student_parameters()
        keys -= student.student_only_keys() - set(state_dict)
    (adopter or WeightAdopter()).adopt(student, state_dict, source, expected=keys)
    finish_loading(student, source)


def load_student(path: str | os.PathLike, config: Mapping[str, Any] | None = None,
                 base: str | os.PathLike | None = None) -> FCDiffusionStudent:
    """The student at `path` (`student.safetensors`, its delta file or a distiller checkpoint), loaded strictly.

    `config` (the student's `{target, params}`, see `distilled_student_config`) is needed only for files that
    record none; `base` (the SD 2.1-base checkpoint) only for delta files.
    """
    return _student(*read_weights(path, base), os.fspath(path), config)


def _student(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str,
             config: Mapping[str, Any] | None) -> FCDiffusionStudent:
    _check_kind(metadata, "student", source)
    student = build_on_meta(_config(metadata, config, source))
    low = frozen_dtype(metadata)
    if low is not None:
        # Round the frozen tensors through the dtype the student was distilled with, as its full file stores
        # them, so a delta over the float32 base gives the full file's values; then hold them in float32.
        cast_parameters([student], low, skip=student.trainable_parameters())
    adopt_student(student, state_dict, source)
    if low is not None:
        cast_parameters([student], torch.float32)
    return student


def frozen_dtype(metadata: Mapping[str, str]) -> torch.dtype | None:
    """The dtype a student's frozen tensors were held in while it was distilled (`distill.teacher_dtype`), or
    None for float32 (and for files that record no distillation)."""
    dtype = precision_dtype((recorded(metadata, "distill") or {}).get("teacher_dtype", "fp32"))
    return None if dtype == torch.float32 else dtype


def load_model(path: str | os.PathLike, base: str | os.PathLike | None = None) -> FCDiffusion | FCDiffusionStudent:
    """The teacher or student at `path`, whichever its metadata says it is (the file is read once); `base` is
    the SD 2.1-base checkpoint a delta file applies over."""
    return read_model(path, base)[0]


def read_model(path: str | os.PathLike, base: str | os.PathLike | None = None
               ) -> tuple[FCDiffusion | FCDiffusionStudent, dict[str, str]]:
    """`load_model` and the file's metadata (all of it, e.g. a student's `fcdiffusion.distill`)."""
    state_dict, metadata = read_weights(path, base)
    if metadata.get("fcdiffusion.kind") == "teacher":
        return _teacher(state_dict, metadata, os.fspath(path), None, None), metadata
    return _student(state_dict, metadata, os.fspath(path), None), metadata


# ---- delta files ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), remembered while the file keeps its size and modification time."""
    stat = os.stat(path)
    return _sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


def delta_keys(model: nn.Module, base_keys: Iterable[str]) -> set[str]:
    """The state-dict keys a delta file of `model` holds: those the base lacks (control net, mode embedding,
    LoRA adapters) and those the model trains (`trained_keys`: e.g. a student's unlocked UNet decoder)."""
    return (set(model.state_dict()) - set(base_keys)) | trained_keys(model)


def export_delta(model: nn.Module, path: str | os.PathLike, base: str | os.PathLike,
                 metadata: Mapping[str, str] | None = None) -> dict[str, int]:
    """Write `model`'s tensors that are not the base's to `path` (atomically), with metadata naming `base`.

    `metadata` defaults to `model.weights_metadata()`. Every other tensor must equal the base's bit for bit
    (a model trained from that base); otherwise a ValueError names the tensors that differ, since the delta
    could not reproduce the model. Returns the delta's and the full model's tensor bytes.
    """
    base_state, _ = load_checkpoint(base)
    full = model.state_dict()
    keys = delta_keys(model, base_state)
    check_state_dict(full, {**base_state, **{k: full[k] for k in keys}}, f"{os.fspath(base)} with the delta")
    info = {**(dict(metadata) if metadata is not None else model.weights_metadata()),
            DELTA_BASE: os.path.basename(os.fspath(base)), DELTA_BASE_SHA256: file_sha256(base)}
    low, parameters = frozen_dtype(info), dict(model.named_parameters())

    def expected(key: str) -> torch.Tensor:  # the base's tensor as the model holds it (see `_student`)
        value = base_state[key].to(low) if low is not None and key in parameters else base_state[key]
        return value.to(full[key].device, full[key].dtype)

    differ = sorted(k for k in set(full) - keys if not torch.equal(expected(k), full[k]))
    if differ:
        raise ValueError(f"{len(differ)} tensors of the model are not those of {os.fspath(base)} (e.g. {differ[:5]}): "
                         "it was not trained from this base; export the full weights file instead")
    save_state_dict({k: full[k] for k in sorted(keys)}, path, info)
    return {"delta_bytes": sum(full[k].numel() * full[k].element_size() for k in keys),
            "full_bytes": sum(v.numel() * v.element_size() for v in full.values())}


def read_weights(path: str | os.PathLike, base: str | os.PathLike | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a weights file; a delta file is applied over `base`, which must be the file it
    names (same SHA-256). The loaders then check the keys strictly, as for any file."""
    state_dict, metadata = load_checkpoint(path)
    recorded_hash = metadata.get(DELTA_BASE_SHA256)
    if recorded_hash is None:
        return state_dict, metadata
    source, name = os.fspath(path), metadata.get(DELTA_BASE, "its base checkpoint")
    if base is None or not os.path.isfile(base):
        given = "" if base is None else f" ({os.fspath(base)} is not there)"
        raise FileNotFoundError(f"{source} is a delta file over {name}: it holds only what its model adds to that "
                                f"checkpoint and loads over it; pass it with --base PATH{given}")
    if file_sha256(base) != recorded_hash:
        raise CheckpointMismatchError(f"{source} applies over {name} (SHA-256 {recorded_hash[:12]}...), but "
                                      f"{os.fspath(base)} is another file (SHA-256 {file_sha256(base)[:12]}...)")
    base_state, _ = load_checkpoint(base)
    return {**base_state, **state_dict}, metadata
