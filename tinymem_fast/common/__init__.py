"""Leaf helpers every layer may use: atomic outputs, optional dependencies, setting checks."""
