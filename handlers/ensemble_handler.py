"""TorchServe entry point: a thin adapter from TorchServe's handler hooks to `handlers.ensemble`.

TorchServe loads exactly one class from this file and builds it without arguments; everything the
handler needs comes from `initialize(context)`. Every request is parsed inside its own try/except
and answered with its own status, so one bad input never fails the rest of its batch.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch
from ts.context import Context

# TorchServe's base handler imports openvino.torch (OpenVINO's torch.compile backend) whenever OpenVINO is installed:
# 3 s of imports at every worker start, and a FutureWarning from torch 2.14. Our `openvino` plan runs the archived
# ONNX through OpenVINO's runtime and never uses that backend, so its import is declined (TorchServe logs "OpenVINO
# is not enabled", meaning that backend only).
# None in sys.modules is the import system's documented way to decline a module; typeshed types only modules there.
sys.modules.setdefault("openvino.torch", None)  # type: ignore[arg-type]
from ts.torch_handler.base_handler import BaseHandler

from handlers.ensemble import BatchAnswer, Ensemble, pick_device
from handlers.ensemble_metrics import EnsembleMetrics
from handlers.errors import EnsembleError, RequestError
from handlers.execution.plans import prepare_cuda
from handlers.inputs.prepare import PreparedRequest
from handlers.worker_exit import Retirement

logger = logging.getLogger(__name__)


# TorchServe ships no type information: its BaseHandler is Any to mypy.
class EnsembleHandler(BaseHandler):  # type: ignore[misc]
    """Serves one ensemble archive: decode once, run every member, combine by policy, per request."""

    def initialize(self, context: Context) -> None:
        properties = context.system_properties
        device = pick_device(properties.get("gpu_id"))
        if device.type == "cpu":
            torch.set_num_threads(1)  # One intra-op thread per task: the ensemble runs members side by side.
        else:
            prepare_cuda()
        self.ensemble = Ensemble.from_model_dir(Path(properties["model_dir"]), device)
        self.metrics = EnsembleMetrics(context.metrics, context.model_name, self.ensemble.spec)
        self.retirement = Retirement(context, self.metrics.flush)
        self.initialized = True
        logger.info("ensemble %s %s ready on %s", self.ensemble.spec.name, self.ensemble.spec.version, device)

    def handle(self, data: list[dict[str, Any]], context: Context) -> Any:
        """TorchServe's handling of a batch, during which the worker is never retired (`worker_exit`)."""
        with self.retirement.serving():
            return super().handle(data, context)

    def preprocess(self, data: list[dict[str, Any]]) -> list[PreparedRequest | EnsembleError]:
        self._started = time.monotonic()  # Deadlines count from here: decoding is part of a request's wait.
        return [self._prepare(idx, row) for idx, row in enumerate(data)]

    def inference(self, data: list[PreparedRequest | EnsembleError], *args: Any, **kwargs: Any) -> BatchAnswer:
        return self.ensemble.answer_batch(data, self._started)

    def postprocess(self, data: BatchAnswer) -> list[str]:
        replies = data.replies
        images = sum(reply.images for reply in replies)
        for idx, reply in enumerate(replies):
            self.context.set_response_status(reply.status, HTTPStatus(reply.status).phrase, idx)
            self.context.set_response_content_type(idx, "application/json")
            self.context.set_response_header(idx, "X-Ensemble-Batch-Requests", str(len(replies)))
            self.context.set_response_header(idx, "X-Ensemble-Batch-Images", str(images))
        self._count(data)
        if data.stuck:
            self.retirement.request(data.stuck)
        return [json.dumps(reply.body) for reply in replies]

    def explain_handle(self, data_preprocess: list[PreparedRequest | EnsembleError], raw_data: Any) -> list[str]:
        """TorchServe routes a whole batch here when its first request came to /explanations: answer it as
        predictions."""
        return self.postprocess(self.inference(data_preprocess))

    def _count(self, answer: BatchAnswer) -> None:
        """Emit the batch's metrics; a failure to count is logged and never costs a request its answer."""
        try:
            self.metrics.record(answer)
        except Exception:
            logger.exception("could not emit this batch's metrics")

    def describe_handle(self) -> str:
        return json.dumps(self.ensemble.describe())

    def _prepare(self, idx: int, row: dict[str, Any]) -> PreparedRequest | EnsembleError:
        try:
            return self.ensemble.prepare(row, self.context.get_all_request_header(idx))
        except RequestError as e:
            return e
        except Exception:  # A bug must fail only this request, never the batch or the worker.
            logger.exception("unexpected error while reading request %d", idx)
            return EnsembleError("internal error while reading this request; see the worker log")
