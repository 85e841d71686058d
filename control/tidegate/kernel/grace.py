"""Grace periods after rule-set flips, waited for where they matter.

A slot retired by a flip may be read by packets that started before it, so
it must not be written (nor trimmed) until an RCU grace period has passed
after that flip (bpfsys.GraceWaiter waits for one: ~10-15 ms). Nothing
else has to wait: packets that start after the flip read the new
selection. So each flip only begins a grace period, on a thread of its
own, and whoever writes a slot first waits until the grace periods of
every flip so far have passed: an apply answers without waiting, and the
next write, some tens of milliseconds later, finds them passed already.
"""

from __future__ import annotations

import logging
import threading

from tidegate.kernel.errors import MapWriteError

log = logging.getLogger("tidegate.kernel.grace")


class GracePeriods:
    """begin() after each flip; wait() before writing a slot. `waiter`
    waits for one grace period (bpfsys.GraceWaiter)."""

    def __init__(self, waiter):
        self._waiter = waiter
        self._cv = threading.Condition()
        self._begun = 0  # flips that began a grace period
        self._passed = 0  # of them, the first how many a passed grace period covers
        self._error: Exception | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def begin(self) -> None:
        """A flip was just written: a grace period must pass before its retired slot is written."""
        with self._cv:
            self._begun += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tidegate-grace", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def wait(self) -> None:
        """Return once a grace period has passed after every flip begun so
        far (at once when it has); MapWriteError if waiting for it failed."""
        with self._cv:
            target = self._begun
            while self._passed < target:
                if self._error is not None or self._closed:
                    raise MapWriteError(f"waiting for the RCU grace period after a rule-set flip failed "
                                        f"({self._error or 'closed'}): no slot is written")  # fmt: skip
                self._cv.wait()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._passed == self._begun and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                target = self._begun  # every flip begun before the grace period starts is covered by it
            try:
                self._waiter.wait()
            except Exception as e:  # noqa: BLE001 - the writer waiting for it raises
                log.error("waiting for an RCU grace period failed", extra={"error": str(e)})
                with self._cv:
                    self._error = e
                    self._cv.notify_all()
                    self._cv.wait(0.1)  # the next attempt, not a busy loop
                continue
            with self._cv:
                self._passed, self._error = target, None
                self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._waiter.close()
