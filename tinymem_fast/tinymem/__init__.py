"""The TinyMem suite: data with injected artifacts, models, training, presets and its metrics."""
