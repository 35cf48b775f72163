"""The data of a training run: the training set (a folder index or tar shards), an optional validation index, and
the Lightning loaders over them.

Both are opened before any model is built, so a missing or malformed `--data` / `--val_data` fails at once, as do
shards too few for the run's ranks and data-loader workers. The training loader shuffles an index (Lightning adds a
`DistributedSampler` under DDP) or streams shards (`fcdiffusion.train.shards`, placed per rank and worker by
webdataset). The validation loader reads its index in order, so its first batch is the same at every validation
(the fixed batch that image grids and per-batch metrics use).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from fcdiffusion.train.dataset import Augment, FCDiffusionDataset
from fcdiffusion.train.shards import ShardStream, is_shard_spec


def open_index(path: str, what: str, resolution: int, augment: Augment | None = None,
               cache_images: bool = False) -> FCDiffusionDataset:
    """The JSON index at `path`; a FileNotFoundError says how to write it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} index not found: {path} (write it with training_data_prepare.py)")
    return FCDiffusionDataset(path, resolution=resolution, augment=augment, cache_images=cache_images)


def planned_world_size(train: Mapping[str, Any]) -> int:
    """The processes a run's Trainer will start (devices x nodes), read from its `train:` section before there is a
    Trainer; `devices: auto` counts the visible GPUs (one process on a CPU)."""
    devices = str(train.get("devices", "auto")).strip().strip("[]")
    if devices.isdigit():
        count = int(devices)
    elif devices in ("auto", "-1"):
        gpus = train.get("accelerator", "auto") != "cpu" and torch.cuda.is_available()
        count = torch.cuda.device_count() if gpus else 1
    else:  # GPU ids: "0,1", "[0, 1]"
        count = len([d for d in devices.split(",") if d.strip()])
    return max(1, count) * max(1, int(train.get("num_nodes", 1)))


def train_switch(train: Mapping[str, Any], name: str) -> bool:
    """The true/false `train:` entry `name` (false when absent), such as `cache_images` (keep each decoded training
    image in memory, for small datasets); a ValueError for any other value."""
    value = train.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"train.{name} must be true or false, got {value!r}")
    return value


class RunData(pl.LightningDataModule):
    """`train_set` (an index dataset or a `ShardStream`) and `val_set` (an index dataset, or None: no validation)."""

    def __init__(self, train_set: Dataset, val_set: FCDiffusionDataset | None, batch_size: int, num_workers: int):
        super().__init__()
        self.train_set, self.val_set = train_set, val_set
        self.batch_size, self.num_workers = batch_size, num_workers

    @classmethod
    def from_train(cls, train: Mapping[str, Any]) -> RunData:
        """The data a `train:` section names (`data`, `val_data`, `resolution`, `augment`, `cache_images`, `seed`,
        ...)."""
        augment = Augment.from_config(train.get("augment"))
        if is_shard_spec(train["data"]):
            train_set: Dataset = ShardStream(train["data"], train["resolution"], augment, seed=int(train["seed"]))
            train_set.check_readers(planned_world_size(train), int(train["num_workers"]))
        else:
            train_set = open_index(train["data"], "training data", train["resolution"], augment,
                                   train_switch(train, "cache_images"))
        val_set = None
        if train.get("val_data"):
            if is_shard_spec(train["val_data"]):
                raise ValueError(f"--val_data takes a JSON index (training_data_prepare.py --val_fraction), not "
                                 f"shards: {train['val_data']}")
            val_set = open_index(train["val_data"], "validation data", train["resolution"])
        return cls(train_set, val_set, int(train["batch_size"]), int(train["num_workers"]))

    def train_dataloader(self) -> DataLoader:
        workers = self.num_workers
        if isinstance(self.train_set, ShardStream):
            # Read here, after the checkpoint is restored: a resumed stream starts new passes in another order.
            self.train_set.start_step = self.trainer.global_step if self.trainer is not None else 0
            return DataLoader(self.train_set, batch_size=self.batch_size, num_workers=workers,
                              persistent_workers=workers > 0)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=workers,
                          drop_last=len(self.train_set) >= self.batch_size, persistent_workers=workers > 0)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            raise RuntimeError("no validation data (--val_data) was given")
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)
