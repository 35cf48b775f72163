"""Index an image-caption folder into the JSON-lines file that `fcdiffusion.dataset` reads.

Layout (img2dataset's ``files`` output, as in the FCDiffusion README): images anywhere under the root,
directly or in subfolders, each with a same-named caption, e.g. ``00000/000000001.jpg`` +
``00000/000000001.txt``. Each output line is ``{"img_path": ..., "prompt": ...}``.

``img_path`` is written relative to the output file's directory (POSIX separators), so the dataset
folder and its index can be moved together; where no relative path exists (another drive on
Windows) it is absolute. `FCDiffusionDataset` resolves relative paths against the same directory.

Images without a caption, empty captions, undecodable captions and files PIL cannot verify are
skipped and counted. Symlinked folders are followed (each real folder once). Lines are sorted by path and
the file is replaced atomically, so a re-run writes a byte-identical file rather than appending duplicates.

An existing index is never replaced by one with fewer records (an empty scan of a mistyped or unmounted
data root, a lost shard) unless ``--force`` is given: the run fails and leaves the old file as it was.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fcdiffusion.image_folder import SKIP_REASONS, collect_pairs
from ldm.util import atomic_write_text


def count_records(index: Path) -> int | None:
    """Number of records (non-blank lines) in an existing index, None when there is no file."""
    if not index.is_file():
        return None
    with open(index, "rb") as f:
        return sum(1 for line in f if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_root", default="datasets/laion_aesthetics_6.5", help="folder of image + caption pairs")
    parser.add_argument("--output", default="datasets/training_data.json", help="JSON-lines index to write")
    parser.add_argument("--workers", type=int, default=4, help="threads verifying images")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing index even with fewer records (or none)")
    args = parser.parse_args(argv)

    if not os.path.isdir(args.data_root):
        print(f"error: data root {args.data_root!r} is not a directory", file=sys.stderr)
        return 1
    output = Path(args.output)
    records, skipped = collect_pairs(args.data_root, output.parent, args.workers)
    print(f"found {len(records) + sum(skipped.values())} images under {args.data_root}")
    for reason in SKIP_REASONS:
        print(f"skipped {reason}: {skipped[reason]}")
    existing = count_records(output)
    if existing is not None and len(records) < existing and not args.force:
        print(f"error: refusing to replace {output} ({existing} records) with {len(records)} records found under "
              f"{args.data_root}; left it unchanged (pass --force to replace it anyway)", file=sys.stderr)
        return 1
    atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"wrote {len(records)} pairs to {output}")
    return 0 if records else 1


if __name__ == "__main__":
    sys.exit(main())
