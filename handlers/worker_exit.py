"""Replacing a worker whose member call is stuck: answer the batch first, then exit so TorchServe starts a new one.

A member call that never returns holds its lane's thread for good (Python cannot stop a thread), so the worker
must go. TorchServe 0.12 gives a worker no way to ask for its replacement, and puts back no request a dying
worker had taken: the batch it was answering gets 500 "Worker died.", and a batch it had started to gather is
dropped (pytorch/serve, `WorkerThread` and `BatchAggregator.cleanJobs`). So the worker answers its batch itself,
on TorchServe's socket, closes the socket at once, and exits: the frontend reads the answers and the end of the
stream together, before it takes another batch from the queue, and the requests queued meanwhile wait for the
new worker (about a second plus the archive's load).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

from ts.protocol.otf_message_handler import create_predict_response

# Not 137: TorchServe reads a worker killed with 137 as out of memory and answers 507.
EXIT_STUCK = 3
logger = logging.getLogger(__name__)


def reply_and_exit(context: Any, bodies: Sequence[str], stuck: Sequence[str]) -> None:
    """Send this batch's `bodies` (statuses and headers already set on `context`) and exit the worker process.

    Outside a TorchServe worker (no socket on the context: a test driving the handler) it only logs.
    """
    logger.error(
        "member(s) %s: a call has run past stuck_after_s; answering this batch, then exiting for TorchServe to "
        "start a new worker",
        ", ".join(stuck),
    )
    connection: socket.socket | None = getattr(context, "cl_socket", None)
    if connection is None:
        return
    connection.sendall(create_predict_response(list(bodies), context.request_ids, "Prediction success", 200, context))
    connection.shutdown(socket.SHUT_RDWR)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(EXIT_STUCK)
