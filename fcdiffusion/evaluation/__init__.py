"""The evaluation suite: one metric per module, run over a results folder by evaluate.py."""
