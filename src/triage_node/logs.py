"""Structured logs: every record carries an ``action`` key plus UIDs, AE titles and statuses.

Never pass patient names, patient IDs or accession numbers: the node logs UIDs only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

from pydicom import config as pydicom_config

ROOT = "triage_node"
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def log_event(logger: logging.Logger, level: int, action: str, message: str, **fields: Any) -> None:
    """Log *message* with a stable ``action`` key and extra fields."""
    logger.log(level, message, extra={"action": action, **fields})


class RepeatedFailure:
    """Logs a failure that repeats every tick (the database away, say) once, then at most once
    per *every* seconds with how often it happened meanwhile, and once more when it is over."""

    def __init__(self, logger: logging.Logger, action: str, every: float = 60.0) -> None:
        self.logger = logger
        self.action = action
        self.every = every
        self._suppressed = 0
        self._next_at = 0.0
        self._failing = False

    def failed(self, level: int, message: str, **fields: Any) -> None:
        now = time.monotonic()
        if self._failing and now < self._next_at:
            self._suppressed += 1
            return
        if self._suppressed:
            fields["repeated"] = self._suppressed
        log_event(self.logger, level, self.action, message, **fields)
        self._failing, self._suppressed, self._next_at = True, 0, now + self.every

    def succeeded(self) -> None:
        if self._failing:
            log_event(
                self.logger,
                logging.INFO,
                f"{self.action}_over",
                "working again",
                repeated=self._suppressed,
            )
        self._failing, self._suppressed = False, 0


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, pid, message, action and the extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``time level [pid] message action=... key=value ...`` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        extras = " ".join(f"{k}={_quote(v)}" for k, v in _extras(record).items())
        line = f"{stamp}Z {record.levelname:<7} [{record.process}] {record.getMessage()}"
        if extras:
            line = f"{line} {extras}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or " " in text or '"' in text) else text


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send triage-node's logs to standard error; keep library logs quiet.

    pynetdicom's own DIMSE/PDU logging can print dataset contents, so it is held at WARNING
    and its identifier logging is switched off where the receiver is set up.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger(ROOT).setLevel(level.upper())
    for noisy in ("pynetdicom", "apscheduler", "alembic", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pydicom's warnings quote element values, which may be patient names or IDs; values are
    # checked by the node itself where it matters.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
