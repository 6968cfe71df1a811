"""Progress of long steps: logged to Dagster, and shown as bars when the CLI listens."""

from __future__ import annotations

import logging
from typing import Callable

Listener = Callable[[str, int, int], None]
listeners: list[Listener] = []
# Things worth telling a person now, not after the run (e.g. "waiting for the writer lock").
notice_listeners: list[Callable[[str], None]] = []


def notify(message: str) -> None:
    for listener in notice_listeners:
        listener(message)


def reporter(log: logging.Logger | logging.LoggerAdapter, every: float = 0.1) -> Listener:
    """A callback for pipeline steps: tells listeners everything, logs every `every` of the way."""
    last: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        for listener in listeners:
            listener(stage, done, total)
        step = max(1, int(total * every))
        if done == total or done - last.get(stage, 0) >= step:
            last[stage] = done
            log.info("%s: %d/%d", stage, done, total)

    return report
