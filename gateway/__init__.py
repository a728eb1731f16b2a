"""The Open Inference Protocol gateway in front of TorchServe.

It serves the v2 health and metadata routes TorchServe 0.12 lacks.
"""
