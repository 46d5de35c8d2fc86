"""The per-terminal token bucket and its table (docs/protocol.md §11, 4005): pure, time passed
in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chefia_rt.sync.ratelimit import RateLimiter, TokenBucket, Verdict

A = ("s1", "pos-1")
B = ("s1", "pos-2")


def test_bucket_starts_full_and_allows_the_burst() -> None:
    bucket = TokenBucket(rate=10, capacity=20, now=0.0)
    assert all(bucket.take(1, 0.0) for _ in range(20))
    assert not bucket.take(1, 0.0)


def test_bucket_refills_at_the_rate_up_to_the_capacity() -> None:
    bucket = TokenBucket(rate=10, capacity=20, now=0.0)
    assert bucket.take(20, 0.0)
    assert not bucket.take(1, 0.05)  # half a token
    assert bucket.take(1, 0.1)
    assert bucket.available(0.1) == pytest.approx(0)
    assert bucket.available(100.0) == 20  # never more than the capacity


def test_refused_take_spends_nothing() -> None:
    bucket = TokenBucket(rate=1, capacity=5, now=0.0)
    assert bucket.take(3, 0.0)
    assert not bucket.take(3, 0.0)
    assert bucket.available(0.0) == 2
    assert bucket.take(2, 0.0)


def test_cost_larger_than_the_capacity_passes_only_from_a_full_bucket_and_leaves_debt() -> None:
    bucket = TokenBucket(rate=10, capacity=20, now=0.0)
    assert bucket.take(50, 0.0)  # a BULK_UPDATE bigger than the burst is not refused forever
    assert bucket.available(0.0) == -30
    assert not bucket.take(1, 2.0)  # ...but it is paid for: 3 s of debt
    assert bucket.take(1, 3.1)
    assert not bucket.take(50, 3.1)  # not full: the big one waits


def test_clock_going_backwards_earns_nothing() -> None:
    bucket = TokenBucket(rate=10, capacity=10, now=5.0)
    assert bucket.take(10, 5.0)
    assert not bucket.take(1, 1.0)
    assert bucket.available(5.0) == 0


@pytest.mark.parametrize(("rate", "capacity"), [(0, 1), (1, 0), (-1, 5)])
def test_bucket_refuses_nonsense(rate: float, capacity: float) -> None:
    with pytest.raises(ValueError, match=r"^rate and capacity must be positive$"):
        TokenBucket(rate, capacity, 0.0)
    with pytest.raises(ValueError, match=r"^cost must not be negative$"):
        TokenBucket(1, 1, 0.0).take(-1, 0.0)


@given(
    st.lists(
        st.tuples(st.floats(0, 0.5), st.integers(1, 30)),
        min_size=1,
        max_size=200,
    )
)
def test_bucket_never_lets_more_than_burst_plus_rate_times_elapsed(
    steps: list[tuple[float, int]],
) -> None:
    """The defining property: over any run, what passed <= burst + rate * elapsed (+ one
    oversized request's debt, none here since every cost fits the capacity)."""
    rate, capacity = 50.0, 40.0
    bucket = TokenBucket(rate, capacity, 0.0)
    now = 0.0
    passed = 0
    for gap, cost in steps:
        now += gap
        if bucket.take(cost, now):
            passed += cost
        assert passed <= capacity + rate * now + 1e-6
        assert -1e-6 <= bucket.available(now) <= capacity


def test_limiter_verdicts_limit_then_abuse() -> None:
    limiter = RateLimiter(rate=10, burst=5, strikes=3, window=10)
    assert [limiter.check(A, 1, 0.0) for _ in range(5)] == [Verdict.ALLOW] * 5
    assert limiter.check(A, 1, 0.0) is Verdict.LIMITED
    assert limiter.check(A, 1, 0.0) is Verdict.LIMITED
    assert limiter.check(A, 1, 0.0) is Verdict.ABUSIVE  # the third refusal within the window


def test_strikes_spread_wider_than_the_window_are_not_abuse() -> None:
    limiter = RateLimiter(rate=1, burst=1, strikes=3, window=10)
    now = 0.0
    for _ in range(10):
        assert limiter.check(A, 1, now) is Verdict.ALLOW
        assert limiter.check(A, 1, now) is Verdict.LIMITED  # one refusal every 6 s
        now += 6.0


def test_terminals_have_their_own_buckets() -> None:
    limiter = RateLimiter(rate=1, burst=2)
    assert limiter.check(A, 2, 0.0) is Verdict.ALLOW
    assert limiter.check(A, 1, 0.0) is Verdict.LIMITED
    assert limiter.check(B, 2, 0.0) is Verdict.ALLOW
    # The same terminal id in another store is another terminal.
    assert limiter.check(("s2", "pos-1"), 2, 0.0) is Verdict.ALLOW


def test_the_table_is_a_bounded_lru() -> None:
    limiter = RateLimiter(rate=1, burst=2, max_terminals=3)
    limiter.check(A, 2, 0.0)  # empty
    for i in range(3):
        limiter.check(("s1", f"other-{i}"), 1, 0.0)
        limiter.check(A, 0, 0.0)  # A stays recently used
    assert len(limiter) == 3
    assert limiter.available(A, 0.0) == 0  # not forgotten: still empty
    assert limiter.available(("s1", "other-0"), 0.0) == 2  # forgotten: unknown = full burst
    limiter.check(("s1", "new"), 1, 0.0)
    assert len(limiter) == 3


def test_limiter_state_survives_as_long_as_the_terminal_is_remembered() -> None:
    """A reconnect is invisible to the limiter: the key, not the connection, owns the bucket."""
    limiter = RateLimiter(rate=1, burst=3, strikes=2, window=10)
    for _ in range(3):
        limiter.check(A, 1, 0.0)
    assert limiter.check(A, 1, 0.5) is Verdict.LIMITED
    # "reconnect": the same key a moment later
    assert limiter.check(A, 1, 0.6) is Verdict.ABUSIVE
    assert limiter.check(A, 1, 0.7) is Verdict.ABUSIVE  # still abusive: strikes remembered too


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0, "burst": 1},
        {"rate": 1, "burst": 0},
        {"rate": 1, "burst": 1, "strikes": 0},
        {"rate": 1, "burst": 1, "window": 0},
        {"rate": 1, "burst": 1, "max_terminals": 0},
    ],
)
def test_limiter_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(
        ValueError, match=r"^(rate and burst|strikes, window and max_terminals) must"
    ):
        RateLimiter(**kwargs)  # type: ignore[arg-type]


def test_the_smallest_limiter_settings_are_valid() -> None:
    limiter = RateLimiter(rate=0.1, burst=0.5, strikes=1, window=0.5, max_terminals=1)
    assert limiter.check(A, 0.5, 0.0) is Verdict.ALLOW
    assert limiter.check(A, 0.5, 0.0) is Verdict.ABUSIVE  # one strike is the whole allowance


def test_a_strike_exactly_one_window_old_no_longer_counts() -> None:
    limiter = RateLimiter(rate=0.01, burst=1, strikes=2, window=10)
    assert limiter.check(A, 1, 0.0) is Verdict.ALLOW
    assert limiter.check(A, 1, 0.0) is Verdict.LIMITED
    assert limiter.check(A, 1, 10.0) is Verdict.LIMITED  # the first strike is out of the window
    assert limiter.check(A, 1, 19.0) is Verdict.ABUSIVE
