"""Training: data (indexes, folders, shards), the Lightning run (flags, trainer, resume), teacher validation,
distillation and its losses, EMA, learning-rate schedules, image and loss logs. Imports `core` and `ldm`."""
