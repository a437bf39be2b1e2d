"""Backoff between polls: the provider's hint first, else growing, never a busy loop."""

from __future__ import annotations

import email.utils
import time

from flux_proxy.polling import Backoff, retry_after_seconds


def test_backoff_grows_to_its_maximum():
    backoff = Backoff(initial=0.5, maximum=2.0, factor=2.0)
    assert [backoff.delay() for _ in range(4)] == [0.5, 1.0, 2.0, 2.0]


def test_retry_after_wins_within_bounds():
    backoff = Backoff(initial=0.5, maximum=5.0, minimum=0.1)
    assert backoff.delay("1") == 1.0
    assert backoff.delay("0") == 0.1
    assert backoff.delay("3600") == 5.0
    assert backoff.delay("soon") == 0.5  # unreadable hint: the schedule


def test_retry_after_as_http_date():
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    seconds = retry_after_seconds(in_ten)
    assert seconds is not None and 8 <= seconds <= 10
    assert retry_after_seconds(None) is None
