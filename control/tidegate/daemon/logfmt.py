"""The agent's default stderr format (--log-format logfmt); json is logjson.py."""

from __future__ import annotations

import json
import logging
import time


def log_time(created: float) -> str:
    """An event's time for both line formats: UTC, RFC 3339, to the
    millisecond (a start-up's progress lines fall within two seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class KeyValueFormatter(logging.Formatter):
    """One line per event: time level msg key=value... Every value but a
    number or a boolean is quoted and JSON-escaped, so a value a caller
    chose (a reason, a rule name) cannot end the line and forge another."""

    _skip = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

    @staticmethod
    def _value(v) -> str:
        if isinstance(v, (bool, int, float)) or v is None:
            return str(v)
        return json.dumps(v if isinstance(v, str) else str(v))

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={self._value(v)}" for k, v in record.__dict__.items() if k not in self._skip)
        msg = record.getMessage()
        line = f"ts={log_time(record.created)} level={record.levelname.lower()} logger={record.name} msg={json.dumps(msg)} {extra}".rstrip()
        if record.exc_info:  # the traceback stays on the line, JSON-escaped
            line += f" exc={json.dumps(self.formatException(record.exc_info))}"
        return line
