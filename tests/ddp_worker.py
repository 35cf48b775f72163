"""Runs fcdiffusion_train.main under DDP; each rank saves its final control-net weights (used by test_train)."""
import os
import sys

import pytorch_lightning as pl
import torch

import fcdiffusion_train


class SaveRankWeights(pl.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu() for k, v in pl_module.control_model.state_dict().items()}
        torch.save({"state": state, "world_size": trainer.world_size, "step": trainer.global_step},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    out_dir, argv = sys.argv[1], sys.argv[2:]
    sys.exit(fcdiffusion_train.main(argv, extra_callbacks=[SaveRankWeights(out_dir)]))
