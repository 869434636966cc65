"""karton-system's ``[<root uid>] Processing task <uid>`` console lines, made cheaply.

The router already publishes one such record per task in its commit (Karton's log
channel); this prints the same line through the system logger's other handlers, as
karton-system does, at INFO.  Per batch, :meth:`ProcessingLines.refresh` checks whether
any handler besides the publisher wants INFO records (nothing is made otherwise); per
task, the record is made for the router's fixed call site (``Logger.makeRecord``, no
``findCaller`` stack walk) and marked published so the publisher skips it.  With a file handler in
the benchmark workers' format, a line costs 10-14 us (``logger.info`` 12-16 us), most of
it the handler's formatting and write; with no such handler, nothing.
"""

from __future__ import annotations

import logging

from .._services._logging import KartonLogHandler

__all__ = ["ProcessingLines"]


class ProcessingLines:
    """Prints a router's per-task lines when the system logger has a console handler."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.enabled = False
        self._site = (__file__, 0, "route")  # the record's pathname, lineno, funcName

    def refresh(self) -> bool:
        """Decide (once per batch) whether lines are printed; return the decision."""
        log = self.log
        if not log.isEnabledFor(logging.INFO):
            self.enabled = False
        else:
            publisher = next((h for h in log.handlers if isinstance(h, KartonLogHandler)), None)
            if publisher is None:
                self.enabled = log.hasHandlers()
            else:
                self.enabled = not publisher.takes_alone(log, logging.INFO)
        return self.enabled

    def processing(self, root_uid: str, task_uid: str) -> None:
        """Hand ``[root_uid] Processing task task_uid`` to the non-publishing handlers."""
        path, lineno, func = self._site
        record = self.log.makeRecord(
            self.log.name, logging.INFO, path, lineno, "[%s] Processing task %s",
            (root_uid, task_uid), None, func,
        )  # fmt: skip
        record.karton_published = True
        self.log.handle(record)
