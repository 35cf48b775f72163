"""Training pairs streamed from WebDataset tar shards, the layout img2dataset writes by default.

`--data 'shards/{00000..00123}.tar'` (brace notation, or `::`-separated paths) names the shards; each holds
samples as members sharing a key, e.g. `000000001.jpg` + `000000001.txt` (+ `.json`, ignored). Items are those of
`FCDiffusionDataset`: ``{"jpg": float32 (resolution, resolution, 3) in [-1, 1], "txt": prompt, "path": shard:key}``.

Placement (webdataset's splitters): shard i goes to DDP rank i mod world_size (`wds.split_by_node`, from
torch.distributed or the RANK / WORLD_SIZE environment), then the rank's shards are dealt to its data-loader
workers (`wds.split_by_worker`), so every sample is read by exactly one rank and worker; there must be at least
world_size x num_workers shards (`check_readers`, which a run calls before any model is built). Each worker reads
its shards in a reshuffled order pass after pass, with a shuffle buffer of `SHUFFLE_BUFFER` encoded samples, for
ever: the run's length is `max_steps`, and ranks with more samples than others never run dry (which would hang DDP).

A member that cannot be decoded, a sample without an image or a caption, and an unreadable shard are logged,
counted (`skipped`, per process, as for the folder dataset) and skipped. A whole pass without one readable
sample is an error rather than an endless loop. A resumed run does not continue from the exact sample where
the last one stopped: it starts new passes whose order is seeded by the step it resumes at, so it does not
replay the samples the run began with.
"""
from __future__ import annotations

import io
import itertools
import os
import random
from collections.abc import Iterator
from typing import Any

import webdataset as wds
from torch.utils.data import IterableDataset

from fcdiffusion.train.dataset import Augment, SkipsUnreadable, load_image
from fcdiffusion.train.image_folder import IMAGE_SUFFIXES

SHUFFLE_BUFFER = 1000  # encoded samples (tens of kB each) per worker
IMAGE_MEMBERS = tuple(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES)


def is_shard_spec(data: str) -> bool:
    """Whether `--data` names tar shards rather than a JSON index."""
    return str(data).endswith(".tar")


def shard_urls(spec: str) -> list[str]:
    """The shards of a brace / `::` spec, in order; local files must exist (FileNotFoundError names a missing one)."""
    urls = wds.shardlists.expand_urls(spec)
    missing = [url for url in urls if "://" not in url and not url.startswith("pipe:") and not os.path.isfile(url)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards of {spec} not found, e.g. {missing[0]}")
    return urls


class ShardStream(SkipsUnreadable, IterableDataset):
    """An endless stream of training pairs from the shards of `spec` (see the module doc).

    `rank` / `world_size` place this stream explicitly (tests, or launchers that set neither torch.distributed nor
    the environment); by default webdataset finds them. `start_step` (set on resume) changes the pass order.
    """

    def __init__(self, spec: str, resolution: int = 512, augment: Augment | None = None, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.spec, self.urls = spec, shard_urls(spec)
        if not self.urls:
            raise ValueError(f"no shards in {spec}")
        self.resolution, self.augment, self.seed = resolution, augment, seed
        self.rank, self.world_size = rank, world_size
        self.start_step = 0

    def placement(self) -> tuple[int, int, int, int]:
        """(rank, world_size, worker, num_workers) of the process iterating this stream."""
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        if self.rank is not None:
            rank, world_size = self.rank, self.world_size or 1
        return rank, world_size, worker, num_workers

    def assigned_shards(self) -> list[str]:
        """The shards this rank and data-loader worker read."""
        source = [{"url": url} for url in self.urls]
        if self.rank is None:
            nodes = wds.split_by_node(source)
        else:
            nodes = itertools.islice(source, self.rank, None, self.world_size or 1)
        return [item["url"] for item in wds.split_by_worker(nodes)]

    def check_readers(self, world_size: int, num_workers: int) -> None:
        """Raise a ValueError when the shards are too few for `world_size` ranks of `num_workers` data-loader
        workers each (0: the rank's own process reads), since every reader needs at least one shard of its own."""
        readers = world_size * max(1, num_workers)
        if len(self.urls) >= readers:
            return
        most = len(self.urls) // world_size
        fix = f"use --num_workers {most} at most, or " if most else ""
        shards = f"{len(self.urls)} shard" + ("s" if len(self.urls) != 1 else "")
        raise ValueError(f"{shards} cannot feed {world_size} rank(s) x {max(1, num_workers)} "
                         f"data-loader worker(s): each reads shards of its own; {fix}write more, smaller shards "
                         "(img2dataset --number_sample_per_shard)")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world_size, worker, num_workers = self.placement()
        shards = self.assigned_shards()
        if not shards:
            self.check_readers(world_size, num_workers)
            raise ValueError(f"no shard of {self.spec} for rank {rank}, worker {worker}")
        for epoch in itertools.count():
            rng = random.Random(f"{self.seed}/{self.start_step}/{rank}/{worker}/{epoch}")
            read = 0
            for sample in self.one_pass(shards, rng):
                read += 1
                yield sample
            if not read:
                raise RuntimeError(f"no readable sample in the {len(shards)} shard(s) of this worker, e.g. {shards[0]}")

    def one_pass(self, shards: list[str], rng: random.Random) -> Iterator[dict[str, Any]]:
        """One shuffled pass over `shards`: the webdataset pipeline, bad samples skipped and counted."""
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(shards, seed=rng.random()),
            wds.tarfile_to_samples(handler=self.unreadable_shard),
            wds.shuffle(SHUFFLE_BUFFER, initial=min(100, SHUFFLE_BUFFER), rng=rng),
            wds.map(self.decode),
            wds.select(lambda item: item is not None),
        )
        return iter(pipeline)

    def unreadable_shard(self, error: Exception) -> bool:
        """webdataset's handler for a shard (or tar member) it cannot read: count it and go on."""
        self.skip(str(error.args[-1]) if error.args else "a shard", error)
        return True

    def decode(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        """A training item from a sample's members, or None (counted) when it has no usable image or caption."""
        name = f"{sample.get('__url__')}:{sample.get('__key__')}"
        member = next((key for key in IMAGE_MEMBERS if key in sample), None)
        try:
            if member is None:
                raise ValueError("no image member")
            prompt = " ".join(bytes(sample.get("txt", b"")).decode("utf-8-sig").split())
            if not prompt:
                raise ValueError("no caption (.txt member missing or empty)")
            image = load_image(io.BytesIO(sample[member]), self.resolution, self.augment)
        except Exception as error:  # any decode failure (OSError, SyntaxError, UnicodeDecodeError, ...)
            self.skip(name, error)
            return None
        return {"jpg": image, "txt": prompt, "path": name}
