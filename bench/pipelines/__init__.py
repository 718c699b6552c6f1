"""Pipeline timings: a training step, scoring, regularizers, an unlearning run, each against a plain
PyTorch / Hugging Face way of doing the same work."""
