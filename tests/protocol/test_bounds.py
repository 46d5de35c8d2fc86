"""Bounds on what a client message may carry: clock skew in conflict decisions (the rest of the
bounds are added below as they come)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from chefia_rt.protocol.messages import client_time, format_timestamp, utc_now_iso


def test_client_time_keeps_a_timestamp_within_the_skew() -> None:
    past = "2024-01-15T10:30:00.000000Z"
    assert client_time(past, 300) == past
    near = format_timestamp(datetime.now(UTC) + timedelta(seconds=60))
    assert client_time(near, 300) == near


def test_client_time_takes_server_time_for_a_timestamp_beyond_the_skew() -> None:
    before = utc_now_iso()
    clamped = client_time("9999-12-31T23:59:59.999999Z", 300)
    assert before <= clamped <= utc_now_iso()
    ahead = format_timestamp(datetime.now(UTC) + timedelta(seconds=400))
    assert before <= client_time(ahead, 300) <= utc_now_iso()
    before = utc_now_iso()
    assert before <= client_time("9999-12-31T23:59:59.999999Z", 0) <= utc_now_iso()


def test_client_time_without_a_timestamp_is_server_time() -> None:
    before = utc_now_iso()
    assert before <= client_time(None, 300) <= utc_now_iso()
