"""SIGINT/SIGTERM ask the loop to stop after the current step, save a checkpoint and exit cleanly."""

from __future__ import annotations

import signal
import threading


class GracefulStop:
    """Context manager: `stop.requested` turns True on the first SIGINT/SIGTERM; a second SIGINT
    interrupts at once (the previous handlers are restored on exit)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
