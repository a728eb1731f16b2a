"""The FlexServe-style baseline: one Flask app with every member in its process, served by gunicorn.

Run by bench/contenders.py as `gunicorn -w 2 'bench.flask_server:create_app()'`. It uses the same
decode, transform, tensor parsing and member code as our handler, so the comparison isolates the
serving stack; its members run as given (eager), as a hand-written app would run them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from flask import Flask, Response, jsonify, request

from handlers.config.files import load_ensembles
from handlers.config.specs import TensorSpec
from handlers.ensemble import Ensemble
from handlers.inputs.images import decode_image
from handlers.inputs.tensors import read_json_instances, read_npy


def create_app() -> Flask:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    spec = load_ensembles(Path(os.environ["BENCH_ENSEMBLES"]))[os.environ["BENCH_ENSEMBLE"]]
    ensemble = Ensemble.from_spec(spec.with_plan("eager"), torch.device("cpu"))
    app = Flask(__name__)

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.post("/predict")
    def predict() -> Response:
        if isinstance(spec.input, TensorSpec):
            read = read_npy if request.mimetype == "application/x-npy" else read_json_instances
            probs = ensemble.probabilities(read(request.get_data(), spec.input, spec.limits))
        else:
            parts = [part.read() for _, part in request.files.items(multi=True)] or [request.get_data()]
            probs = ensemble.probabilities([decode_image(data, spec.limits) for data in parts])
        return jsonify(ensemble.render(probs, spec.policy))

    return app
