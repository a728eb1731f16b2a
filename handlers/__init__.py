"""Ensemble plugin for TorchServe: the entry point and the Ensemble over the concern packages below it."""
