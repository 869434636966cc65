"""karton-system's ``[<root uid>] Processing task <uid>`` console lines, made cheaply.

The router already publishes one such record per task in its commit (Karton's log
channel); this prints the same line through the system logger's other handlers, as
karton-system does, at INFO.  Per batch, :meth:`ProcessingLines.refresh` checks whether
any handler besides the publisher wants INFO records (nothing is made otherwise); per
task, the record is copied from a template (:class:`RecordMaker`: no ``findCaller``
stack walk) and marked published so the publisher skips it.  With a file handler in
the benchmark workers' format, a line costs 10-14 us (``logger.info`` 12-16 us), most of
it the handler's formatting and write; with no such handler, nothing.
"""

from __future__ import annotations

import logging

from .._services._logging import KartonLogHandler, RecordMaker, needs_record

__all__ = ["ProcessingLines"]


class ProcessingLines:
    """Prints a router's per-task lines when the system logger has a console handler."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.enabled = False
        self._maker = RecordMaker(log, __file__, "route")

    def refresh(self) -> bool:
        """Decide (once per batch) whether lines are printed; return the decision."""
        log = self.log
        if not log.isEnabledFor(logging.INFO):
            self.enabled = False
        else:
            publisher = next((h for h in log.handlers if isinstance(h, KartonLogHandler)), None)
            self.enabled = needs_record(log, logging.INFO, publisher)
        return self.enabled

    def processing(self, root_uid: str, task_uid: str) -> None:
        """Hand ``[root_uid] Processing task task_uid`` to the non-publishing handlers."""
        record = self._maker.make(logging.INFO, "[%s] Processing task %s", (root_uid, task_uid))
        record.karton_published = True
        self.log.handle(record)
