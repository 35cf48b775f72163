"""Applications built on the pipeline: the speed/fidelity/memory benchmark and the browser demo."""
