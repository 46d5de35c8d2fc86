"""Per-terminal operation rate (docs/protocol.md §11, 4005), pure: the caller passes the time in.

Each terminal (store, terminal_id) has a token bucket: `rate` operations per second on average,
up to `burst` at once. An operation over the limit is refused (`sync_error` 4005) and counts as a
strike; `strikes` refusals within `window` seconds is sustained abuse and closes the connection.

The state belongs to the terminal, not to its connection: a terminal that reconnects finds its
bucket (and its strikes) where it left them, so reconnecting is no way around the limit. The
table is a bounded LRU; the entries it forgets first are the least recently used, whose buckets
have long refilled, so forgetting them changes nothing.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from enum import Enum


class Verdict(Enum):
    """What to do with an operation."""

    ALLOW = "allow"
    LIMITED = "limited"  # refuse it (4005), the connection stays
    ABUSIVE = "abusive"  # refuse it and close the connection (4005)


class TokenBucket:
    """`rate` tokens per second, at most `capacity` saved up; starts full.

    A request costing more than the whole capacity (a BULK_UPDATE larger than the burst) is let
    through when the bucket is full and leaves it in debt, so it is neither refused forever nor
    a way to exceed the rate over time.
    """

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError("rate and capacity must be positive")
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        # A clock that went backwards (it never should; monotonic) earns nothing.

    def available(self, now: float) -> float:
        self._refill(now)
        return self.tokens

    def take(self, cost: float, now: float) -> bool:
        """Spend `cost` tokens if they are there; False (nothing spent) otherwise."""
        if cost < 0:
            raise ValueError("cost must not be negative")
        self._refill(now)
        if self.tokens >= min(cost, self.capacity):
            self.tokens -= cost
            return True
        return False


class _Terminal:
    """One terminal's bucket and its recent refusals (at most `strikes` remembered)."""

    __slots__ = ("bucket", "refusals")

    def __init__(self, bucket: TokenBucket, strikes: int) -> None:
        self.bucket = bucket
        self.refusals: deque[float] = deque(maxlen=strikes)


class RateLimiter:
    """The buckets of every terminal a worker has seen lately, keyed (store_id, terminal_id)."""

    __slots__ = ("_terminals", "burst", "max_terminals", "rate", "strikes", "window")

    def __init__(
        self,
        rate: float,
        burst: float,
        strikes: int = 100,
        window: float = 10.0,
        max_terminals: int = 10_000,
    ) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        if strikes < 1 or window <= 0 or max_terminals < 1:
            raise ValueError("strikes, window and max_terminals must be positive")
        self.rate = rate
        self.burst = burst
        self.strikes = strikes
        self.window = window
        self.max_terminals = max_terminals
        self._terminals: OrderedDict[tuple[str, str], _Terminal] = OrderedDict()

    def __len__(self) -> int:
        return len(self._terminals)

    def _terminal(self, key: tuple[str, str], now: float) -> _Terminal:
        terminal = self._terminals.get(key)
        if terminal is None:
            terminal = _Terminal(TokenBucket(self.rate, self.burst, now), self.strikes)
            self._terminals[key] = terminal
            while len(self._terminals) > self.max_terminals:
                self._terminals.popitem(last=False)
        else:
            self._terminals.move_to_end(key)
        return terminal

    def check(self, key: tuple[str, str], cost: float, now: float) -> Verdict:
        """Charge `cost` operations to the terminal `key` at time `now` (seconds)."""
        terminal = self._terminal(key, now)
        if terminal.bucket.take(cost, now):
            return Verdict.ALLOW
        refusals = terminal.refusals
        refusals.append(now)
        if len(refusals) == self.strikes and refusals[0] > now - self.window:
            return Verdict.ABUSIVE
        return Verdict.LIMITED

    def available(self, key: tuple[str, str], now: float) -> float:
        """Operations the terminal could send right now (the full burst if it is unknown)."""
        terminal = self._terminals.get(key)
        return self.burst if terminal is None else terminal.bucket.available(now)
