"""Experiments built on the library: the unlearning pipeline, sweeps and grids, reports, the
Pythia protocol, the demo."""
