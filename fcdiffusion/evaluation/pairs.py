"""Matching a results folder to its sources by file name, never silently.

`test_distillation.py` writes `<name>_<mode>.png` (plus `_control` and `_grid` pictures) for each source
`<name>.<ext>` of its input folder; inputs sharing a stem are written as `<stem>_<ext>_<mode>.png`. A result with
no source, a source with no result, and a result missing from the reference folder are reported, not guessed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fcdiffusion.core.frequency import CONTROL_MODES
from fcdiffusion.train.image_folder import prompted_images


@dataclass(frozen=True)
class Pair:
    """One translated image: its name and mode, the files involved and the prompt it was translated with."""

    name: str
    mode: str
    source: Path
    result: Path
    prompt: str
    reference: Path | None = None


def parse_result(path: Path) -> tuple[str, str] | None:
    """(name, mode) of a result file `<name>_<mode>.png`, or None for control signals, grids and other files."""
    if path.suffix.lower() != ".png":
        return None
    for mode in CONTROL_MODES:
        if path.stem.endswith(f"_{mode}") and len(path.stem) > len(mode) + 1:
            return path.stem[: -len(mode) - 1], mode
    return None


def source_names(sources: list[Path]) -> dict[str, Path]:
    """The name each source's results carry: its stem, or `<stem>_<ext>` where stems collide."""
    stems: dict[str, int] = {}
    for path in sources:
        stems[path.stem.casefold()] = stems.get(path.stem.casefold(), 0) + 1
    return {(path.stem if stems[path.stem.casefold()] == 1 else f"{path.stem}_{path.suffix[1:]}"): path
            for path in sources}


def match_pairs(results: str | os.PathLike, input_dir: str | os.PathLike, prompt: str | None = None,
                reference: str | os.PathLike | None = None) -> tuple[list[Pair], list[str]]:
    """The result/source (/reference) pairs, sorted by name and mode, and a message per file left out."""
    found, problems = prompted_images(input_dir, prompt)
    prompts = dict(found)
    by_name = source_names([path for path, _ in found])
    pairs, matched = [], set()
    for path in sorted(Path(results).iterdir()):
        parsed = parse_result(path)
        if parsed is None:
            continue
        name, mode = parsed
        source = by_name.get(name)
        if source is None:
            problems.append(f"skipping {path}: no source image named {name}.* with a prompt in {input_dir}")
            continue
        ref = Path(reference) / path.name if reference is not None else None
        if ref is not None and not ref.is_file():
            problems.append(f"skipping {path}: no {path.name} in the reference folder {reference}")
            continue
        matched.add(source)
        pairs.append(Pair(name, mode, source, path, prompts[source], ref))
    problems += [f"no results for source {path} in {results}" for path in by_name.values() if path not in matched]
    return pairs, problems
