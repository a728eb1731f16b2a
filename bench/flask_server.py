"""The FlexServe-style baseline: one Flask app with every member in its process, served by gunicorn.

Run by bench/contenders.py as `gunicorn -w <workers> 'bench.flask_server:create_app()'` with the ensemble's
extracted archive and each member's plan in the environment (bench/archived.py): the same member files,
plans and thread settings as ours, and the same decode, transform and rendering code, so the comparison
isolates the serving stack. Flask has no batching: each request is one call of the members.
"""

from __future__ import annotations

from flask import Flask, Response, jsonify, request

from bench.archived import from_environment
from handlers.config.specs import TensorSpec
from handlers.inputs.images import decode_image
from handlers.inputs.tensors import read_json_instances, read_npy


def create_app() -> Flask:
    ensemble = from_environment()
    spec = ensemble.spec
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
