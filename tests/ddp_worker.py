"""Runs fcdiffusion_train.main (or, with `--distill` first, fcdiffusion_distill.main) under DDP; each rank saves its
final trained weights (a teacher's control net, the student's trained tensors), its EMA of them (with --ema_decay),
the training samples it read and, for the distiller, how its frozen tensors are held (used by test_train)."""
import os
import sys

import pytorch_lightning as pl
import torch

import fcdiffusion_distill
import fcdiffusion_train


class SaveRankWeights(pl.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.paths: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.paths += list(batch.get("path", []))

    def on_train_end(self, trainer, pl_module):
        record = {"world_size": trainer.world_size, "step": trainer.global_step, "paths": self.paths}
        if hasattr(pl_module, "student"):
            student = pl_module.student
            trained = {id(p) for p in student.trainable_parameters()}
            record["state"] = {n: p.detach().cpu() for n, p in student.named_parameters() if id(p) in trained}
            teachers = list(pl_module.teachers.values())
            frozen = [p for p in student.parameters() if id(p) not in trained]
            # Each frozen tensor of the student is the very tensor of a teacher: held once in this process.
            teacher_tensors = {p.data_ptr() for t in teachers for p in t.parameters()}
            record["frozen_shared"] = sum(p.data_ptr() in teacher_tensors for p in frozen) / len(frozen)
            record["counts"] = pl_module.parameter_counts()
        else:
            record["state"] = {k: v.detach().cpu() for k, v in pl_module.control_model.state_dict().items()}
        ema = getattr(pl_module, "ema", None)
        record["ema"] = {k: v.cpu() for k, v in ema.shadow.items()} if ema is not None else None
        torch.save(record, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    distill = sys.argv[1] == "--distill"
    out_dir, argv = sys.argv[1 + distill], sys.argv[2 + distill:]
    script = fcdiffusion_distill if distill else fcdiffusion_train
    sys.exit(script.main(argv, extra_callbacks=[SaveRankWeights(out_dir)]))
