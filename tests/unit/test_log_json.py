"""`tidegate agent --log-format json`: one JSON object a line, the same
fields as the logfmt line, a caller's newline cannot start another line."""

from __future__ import annotations

import json
import logging
import re

from tidegate.daemon.options import build_parser
from tidegate.daemon.logfmt import KeyValueFormatter
from tidegate.daemon.logjson import JsonFormatter


def test_one_object_per_line_with_the_event_fields():
    rec = logging.makeLogRecord({"name": "tidegate.daemon.agent", "levelname": "INFO", "msg": "applied",
                                 "version": 3, "reason": "evil\n{\"msg\": \"forged\"}", "guarded": False})  # fmt: skip
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    obj = json.loads(line)
    assert (obj["level"], obj["logger"], obj["msg"], obj["version"], obj["guarded"]) == (
        "info", "tidegate.daemon.agent", "applied", 3, False)
    assert obj["reason"] == "evil\n{\"msg\": \"forged\"}" and obj["ts"].endswith("Z")


def test_the_agent_offers_both_formats():
    p = build_parser()
    assert p.parse_args(["-i", "eth0"]).log_format == "logfmt"
    assert p.parse_args(["-i", "eth0", "--log-format", "json"]).log_format == "json"


def test_both_formats_give_the_time_to_the_millisecond_in_utc():
    """A start-up's progress lines fall within two seconds: whole seconds
    could not tell them apart."""
    rec = logging.makeLogRecord({"name": "tidegate.daemon.agent", "levelname": "INFO", "msg": "program loaded"})
    rec.created = 1796298362.0479  # 2026-12-03T11:46:02.047Z
    assert json.loads(JsonFormatter().format(rec))["ts"] == "2026-12-03T11:46:02.047Z"
    assert KeyValueFormatter().format(rec).startswith("ts=2026-12-03T11:46:02.047Z level=info ")
    rec.created = 1796298362.0
    assert re.match(r"ts=2026-12-03T11:46:02\.000Z ", KeyValueFormatter().format(rec))
