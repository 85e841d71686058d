"""`--log-format json`: one JSON object per line for log shippers (Vector,
Fluent Bit, journald's JSON export), with the same fields as the logfmt
lines: ts, level, logger, msg, then each key=value the event carries."""

from __future__ import annotations

import json
import logging

from tidegate.daemon.logfmt import log_time

_SKIP = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": log_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _SKIP and k not in out:
                out[k] = v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)
