"""Index an image-caption folder into the JSON-lines file that `fcdiffusion.train.dataset` reads.

Layout (img2dataset's ``files`` output, as in the FCDiffusion README): images anywhere under the root,
directly or in subfolders, each with a same-named caption, e.g. ``00000/000000001.jpg`` +
``00000/000000001.txt``. Each output line is ``{"img_path": ..., "prompt": ...}``.

``img_path`` is written relative to the output file's directory (POSIX separators), so the dataset
folder and its index can be moved together; where no relative path exists (another drive on
Windows) it is absolute. `FCDiffusionDataset` resolves relative paths against the same directory.

Images without a caption, empty captions, undecodable captions and files PIL cannot verify are
skipped and counted. Symlinked folders are followed (each real folder once). Lines are sorted by path and
the file is replaced atomically, so a re-run writes a byte-identical file rather than appending duplicates.

``--val_fraction F`` holds out about F of the pairs into a second index (``--val_output``, by default the output
with ``_val`` before the suffix) for the trainers' ``--val_data``. Which side a pair falls on is decided by a hash
of its path under the data root alone, so the split is the same on every run and machine, the two indexes never
share a pair, and a pair never changes sides as the crawl grows.

An existing index is never replaced by one with fewer records (an empty scan of a mistyped or unmounted
data root, a lost shard) unless ``--force`` is given: the run fails and leaves the old files as they were.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fcdiffusion import cli
from fcdiffusion.train.image_folder import SKIP_REASONS, collect_pairs
from ldm.util import atomic_write_text


def count_records(index: Path) -> int | None:
    """Number of records (non-blank lines) in an existing index, None when there is no file."""
    if not index.is_file():
        return None
    with open(index, "rb") as f:
        return sum(1 for line in f if line.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__.split("\n")[0])
    parser.add_argument("--data_root", default="datasets/laion_aesthetics_6.5", help="folder of image + caption pairs")
    parser.add_argument("--output", default="datasets/training_data.json", help="JSON-lines index to write")
    parser.add_argument("--workers", type=int, default=4, help="threads verifying images")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing index even with fewer records (or none)")
    parser.add_argument("--val_fraction", type=float, default=0.0,
                        help="hold out this fraction of the pairs (by a hash of each path) for validation")
    parser.add_argument("--val_output", help="the held-out index (default: the output with _val before the suffix)")
    return parser


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    """Scan the data root, then write the index (and the held-out one); status 1 when no pair was found."""
    if not os.path.isdir(args.data_root):
        raise cli.UsageError(f"data root {args.data_root!r} is not a directory")
    if not 0.0 <= args.val_fraction < 1.0:
        raise cli.UsageError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    output = Path(args.output)
    val_output = Path(args.val_output or output.with_name(f"{output.stem}_val{output.suffix}"))
    if args.val_fraction > 0 and val_output.resolve() == output.resolve():
        raise cli.UsageError("--val_output must differ from --output")
    records, held, skipped = collect_pairs(args.data_root, output.parent, args.workers, args.val_fraction)
    print(f"found {len(records) + len(held) + sum(skipped.values())} images under {args.data_root}")
    for reason in SKIP_REASONS:
        print(f"skipped {reason}: {skipped[reason]}")
    outputs = {output: records, **({val_output: held} if args.val_fraction > 0 else {})}
    for path, lines in outputs.items():
        existing = count_records(path)
        if existing is not None and len(lines) < existing and not args.force:
            raise ValueError(f"refusing to replace {path} ({existing} records) with {len(lines)} records found "
                             f"under {args.data_root}; left it unchanged (pass --force to replace it anyway)")
    for path, lines in outputs.items():
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
        print(f"wrote {len(lines)} pairs to {path}")
    return 0 if records else 1


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
