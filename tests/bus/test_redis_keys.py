"""Lock keys are JSON of their parts: the fast path must write exactly what json.dumps writes,
or keys written by workers of the previous release would no longer be found."""

from __future__ import annotations

import json
import random

from chefia_rt.bus.redis_state import json_parts

ALPHABET = 'ab"\\\x00\x1f\x7f\u00e9:-. \u725b\U0001f367'


def test_lock_key_parts_are_json_byte_for_byte() -> None:
    rng = random.Random(12)
    cases = [("s1", "orders", "order-1"), ("", "", ""), ('a"b', "c\\d", "\u00e9")]
    cases += [
        tuple("".join(rng.choice(ALPHABET) for _ in range(rng.randrange(5))) for _ in range(3))
        for _ in range(20_000)
    ]
    for parts in cases:
        assert json_parts(*parts) == json.dumps(list(parts)), parts
