"""Ensemble plugin for TorchServe: manifest, members, preprocessing, policies, errors and the handler."""
