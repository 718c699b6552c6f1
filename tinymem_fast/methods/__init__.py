"""Mitigation methods, registered by name (:func:`get_method`). Each is a small config dataclass plus a
``run(model, inputs, cfg) -> info`` function that edits the model in place."""

from .registry import METHODS, UnlearnInputs, get_method, method_names

__all__ = ["METHODS", "UnlearnInputs", "get_method", "method_names"]
