"""Status messages cut to a safe length; client-caused log lines rate-limited."""

from __future__ import annotations

import logging
import time

import pytest

from services.common.errors import MAX_MESSAGE_CHARS, safe_message
from services.common.interceptor import RateLimitedLog


def test_short_messages_pass_unchanged() -> None:
    assert safe_message("count: must be in [1, 100], got 0") == "count: must be in [1, 100], got 0"


def test_long_messages_are_cut_and_control_characters_replaced() -> None:
    message = safe_message("scene: unknown scene '" + "s\r\n" * 5000 + "'")
    assert len(message) == MAX_MESSAGE_CHARS
    assert message.startswith("scene: unknown scene 's??s??")
    assert message.endswith("… (message cut)")
    assert "\r" not in message
    assert "\n" not in message


def test_a_rate_limited_log_writes_one_line_per_window(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.rate_limited")
    limited = RateLimitedLog(logger, window_seconds=0.2)
    with caplog.at_level(logging.WARNING, logger="tests.rate_limited"):
        written = [limited.warning("undecodable request %s", n) for n in range(50)]
        time.sleep(0.25)
        limited.warning("undecodable request %s", "late")
    assert written.count(True) == 1
    assert [record.getMessage() for record in caplog.records] == [
        "undecodable request 0 (0 more not logged in the last window)",
        "undecodable request late (49 more not logged in the last window)",
    ]
