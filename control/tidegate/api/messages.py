"""The review and the insight reading as typed messages.

The producers (safety/review.py, observation/reading.py, safety/propose.py)
build plain dicts; the .proto names a field for every key they make, with
the same snake_case name. A key without a field is an error (`strict`), so a
producer that grows a key fails the unit test that converts every reading
and review (tests/unit/test_messages.py) until the .proto has the field.
The service is strict for the insight reading (made for each call) and
lenient for reviews: one stored by an older agent may hold a key this one
no longer has, and is served without it (and a warning logged).
None is an unset field: an `optional` scalar or a sub-message.
"""

from __future__ import annotations

import logging

from google.protobuf import json_format

from tidegate.v1 import tidegate_pb2 as pb

log = logging.getLogger("tidegate.api.messages")


def _message(data: dict, msg, strict: bool):
    try:
        return json_format.ParseDict(data, msg)
    except json_format.ParseError as e:
        if strict:
            raise ValueError(f"{msg.DESCRIPTOR.name}: {str(e).splitlines()[0]}") from None
        log.warning("%s: served without what it cannot hold: %s", msg.DESCRIPTOR.name, e)
        msg.Clear()
        return json_format.ParseDict(data, msg, ignore_unknown_fields=True)


def review(data: dict, strict: bool = True) -> pb.Review:
    """A review dict (safety/review.py) as a Review."""
    return _message(data, pb.Review(), strict)


def insight(data: dict, strict: bool = True) -> pb.InsightResponse:
    """A reading dict (observation/reading.py, insight.py), with its `proposal`, as an InsightResponse."""
    return _message(data, pb.InsightResponse(), strict)
