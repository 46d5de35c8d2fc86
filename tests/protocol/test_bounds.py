"""Bounds on what a client message may carry: clock skew in conflict decisions (the rest of the
bounds are added below as they come)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import pytest

from chefia_rt.protocol.messages import client_time, format_epoch, format_timestamp, utc_now_iso


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


def test_client_time_bounds_each_skew_by_its_own_value() -> None:
    """A timestamp accepted under a wide skew is not accepted under a narrower one after it
    (client_time remembers its last bound)."""
    ahead = format_timestamp(datetime.now(UTC) + timedelta(seconds=200))
    assert client_time(ahead, 300) == ahead
    before = utc_now_iso()
    assert before <= client_time(ahead, 100) <= utc_now_iso()
    assert client_time(ahead, 300) == ahead


def test_client_time_bounds_by_the_clock_after_it_stepped_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bound remembered from before the wall clock stepped back is not trusted after."""
    ahead = format_timestamp(datetime.now(UTC) + timedelta(seconds=250))
    assert client_time(ahead, 300) == ahead
    stepped = time.time() - 120
    monkeypatch.setattr(time, "time", lambda: stepped)
    clamped = client_time(ahead, 300)
    assert clamped == format_timestamp(datetime.fromtimestamp(stepped, UTC))


def test_format_timestamp_is_fixed_width_for_any_fraction_and_offset() -> None:
    for moment, text in [
        (datetime(2024, 1, 15, 10, 30), "2024-01-15T10:30:00.000000Z"),
        (datetime(2024, 1, 15, 10, 30, 0, 5), "2024-01-15T10:30:00.000005Z"),
        (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00.000000Z"),
        (
            datetime(2024, 1, 1, 0, 0, 0, 999_999, tzinfo=timezone(timedelta(microseconds=1))),
            "2024-01-01T00:00:00.999998Z",
        ),
        (
            datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=timezone(-timedelta(microseconds=999_999))),
            "2024-01-01T00:00:01.000000Z",
        ),
        (
            datetime(2024, 1, 1, 5, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
            "2024-01-01T00:00:00.000000Z",
        ),
    ]:
        assert format_timestamp(moment) == text


def test_format_epoch_is_the_canonical_timestamp_of_epoch_seconds() -> None:
    assert format_epoch(0) == "1970-01-01T00:00:00.000000Z"
    assert format_epoch(1_705_314_600.25) == "2024-01-15T10:30:00.250000Z"
    assert format_epoch(253_402_300_799) == "9999-12-31T23:59:59.000000Z"
    assert format_epoch(None) is None
