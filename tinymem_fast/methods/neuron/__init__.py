"""Neuron-level unlearning methods: attribute, then ablate the top neurons of every MLP layer."""
