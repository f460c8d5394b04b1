from __future__ import annotations

import json
import logging
import time

import pytest

from services.common.deadline import Deadline
from services.common.logs import JsonFormatter, TextFormatter, request_id_var


def test_budget_leaves_the_margin_and_never_goes_negative() -> None:
    deadline = Deadline.after(0.5)
    assert 0.35 < deadline.budget(margin=0.1) <= 0.4
    assert deadline.budget(margin=0.1, cap=0.05) == 0.05
    assert Deadline.after(0.01).budget(margin=1.0) == 0.0
    expired = Deadline(time.monotonic() - 1)
    assert expired.expired
    assert expired.remaining() == 0.0


def test_a_call_without_deadline_gets_the_default_cap() -> None:
    assert Deadline.from_remaining(None, default=0.2).remaining() == pytest.approx(0.2, abs=0.01)
    assert Deadline.from_remaining(5.0, default=0.2).remaining() == pytest.approx(0.2, abs=0.01)
    assert Deadline.from_remaining(0.1, default=0.2).remaining() == pytest.approx(0.1, abs=0.01)


def _record(message: str, **extra: object) -> logging.LogRecord:
    token = request_id_var.set("rid-1")
    try:
        record = logging.getLogger("recsys.test").makeRecord(
            "recsys.test", logging.INFO, __file__, 1, message, (), None, extra=extra
        )
    finally:
        request_id_var.reset(token)
    record.service = "recall"
    return record


def test_json_log_lines_carry_the_request_id_and_extra_fields() -> None:
    entry = json.loads(JsonFormatter().format(_record("loaded %s", version="v7")))
    assert entry["msg"] == "loaded %s"
    assert entry["request_id"] == "rid-1"
    assert entry["service"] == "recall"
    assert entry["version"] == "v7"
    assert entry["level"] == "info"


def test_text_log_lines_are_readable() -> None:
    line = TextFormatter().format(_record("loaded", version="v7"))
    assert "[rid-1]" in line
    assert line.endswith("loaded version=v7")
