"""Replacing a worker whose member call is stuck, at a moment it holds no request, so that none is lost.

A member call that never returns holds its thread for good (Python cannot stop a thread). The ensemble gives the
member a new lane at once (`execution.lanes`), so answers go on; the worker itself is replaced to free the stuck
thread. TorchServe 0.12 gives a worker no way to ask for its replacement, and puts back no request a dying worker
had taken: a batch the worker was answering gets 500 "Worker died.", and requests the frontend was gathering into
a batch for it are dropped without an answer (pytorch/serve `WorkerThread`, `BatchAggregator.cleanJobs`). Exiting
right after answering a batch lost requests that way under load. So the worker exits only once it has been idle for
QUIET_S (no batch in hand, none arriving on its socket): the frontend is then waiting for a request to come, and
the ones that come while the worker restarts wait in TorchServe's queue for the new one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

# Not 137: TorchServe reads a worker killed with 137 as out of memory and answers 507.
EXIT_STUCK = 3
# How long the worker must have had no batch before it exits.
QUIET_S = 1.0
logger = logging.getLogger(__name__)


class Retirement:
    """Exits this worker for TorchServe to replace, once asked to (`request`) and idle for QUIET_S.

    The handler answers every batch inside `serving()`; `flush` (the metrics') runs just before the exit.
    """

    def __init__(self, context: Any, flush: Callable[[], None], *, quiet_s: float = QUIET_S) -> None:
        self._context = context
        self._flush = flush
        self._quiet_s = quiet_s
        self._lock = threading.Lock()
        self._idle_since = time.monotonic()
        self._watch: threading.Thread | None = None

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Hold the worker while it answers a batch: it never exits in between."""
        with self._lock:
            try:
                yield
            finally:
                self._idle_since = time.monotonic()

    def request(self, stuck: Sequence[str]) -> None:
        """Replace this worker at its next idle moment (once; later requests only log)."""
        logger.error(
            "member(s) %s: a call has run past stuck_after_s; the member has a new thread, and this worker exits "
            "for TorchServe to replace it once it has had no request for %.1f s",
            ", ".join(stuck),
            self._quiet_s,
        )
        connection: socket.socket | None = getattr(self._context, "cl_socket", None)
        if self._watch is None and connection is not None:
            self._watch = threading.Thread(target=self._exit_when_idle, args=(connection,), daemon=True)
            self._watch.start()

    def _exit_when_idle(self, connection: socket.socket) -> None:
        while True:
            time.sleep(self._quiet_s / 4)
            with self._lock:
                if time.monotonic() - self._idle_since < self._quiet_s:
                    continue
                if select.select([connection], [], [], 0)[0]:
                    continue  # A batch is arriving: answer it first.
                try:
                    self._flush()
                except Exception:
                    logger.exception("could not emit the last metrics before exiting")
                for handler in logging.getLogger().handlers:
                    handler.flush()
                connection.shutdown(socket.SHUT_RDWR)
                os._exit(EXIT_STUCK)
