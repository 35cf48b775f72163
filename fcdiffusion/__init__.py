"""FCDiffusion and its few-step student, in layers that import downwards only (checked by `make lint`):

- `fcdiffusion.core`: frequency filters, the control net, teacher and student models, weight files, precision and
  the translation pipeline (`core.inference.Translator`), on top of the SD-compatible `ldm` package;
- `fcdiffusion.train`: data, the training loop, distillation, callbacks, EMA, schedules;
- `fcdiffusion.evaluation`: the metrics and the suite `evaluate.py` runs;
- `fcdiffusion.apps`: the benchmark and the browser demo;
- `fcdiffusion.cli`: the command-line skeleton every top-level script shares.
"""
