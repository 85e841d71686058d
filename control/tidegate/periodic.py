"""A background job of the agent: one step every few seconds on a daemon thread.

The deny-list expiry, auto-mitigation and the refused-call log run this way.
A failing step is logged and the next one runs: a background job never
takes the agent down."""

from __future__ import annotations

import logging
import threading
from typing import Callable


class Periodic:
    def __init__(self, name: str, interval: float, step: Callable[[], object], log: logging.Logger, failure: str):
        """name: the thread's; step: called every `interval` seconds; failure: what the log says
        when a step raises."""
        self.name, self.interval, self.step, self.log, self.failure = name, interval, step, log, failure
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name=self.name, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.step()
            except Exception:
                self.log.exception(self.failure)
