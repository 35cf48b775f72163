"""Runs fcdiffusion_train.main under DDP; each rank saves its final control-net weights, its EMA of them (with
--ema_decay) and the training samples it read (used by test_train)."""
import os
import sys

import pytorch_lightning as pl
import torch

import fcdiffusion_train


class SaveRankWeights(pl.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.paths: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.paths += list(batch["path"])

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu() for k, v in pl_module.control_model.state_dict().items()}
        ema = getattr(pl_module, "ema", None)
        torch.save({"state": state, "world_size": trainer.world_size, "step": trainer.global_step,
                    "ema": {k: v.cpu() for k, v in ema.shadow.items()} if ema is not None else None,
                    "paths": self.paths},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    out_dir, argv = sys.argv[1], sys.argv[2:]
    sys.exit(fcdiffusion_train.main(argv, extra_callbacks=[SaveRankWeights(out_dir)]))
