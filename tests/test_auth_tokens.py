"""chefia_rt.auth without a server: issuing, verifying, key lists, durations, log redaction."""

from __future__ import annotations

import base64
import logging
import sys
import time

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chefia_rt.auth import (
    Claims,
    RedactTokens,
    authenticate,
    authorize_terminal,
    issue_token,
    parse_duration,
    parse_keys,
    redact,
    request_token,
    verify_token,
)
from chefia_rt.errors import AuthFailed, Code

KEY = "unit-test-key-0123456789abcdef-0123456789"
OLD = "unit-test-old-key-fedcba9876543210-fedcba98"


def test_round_trip() -> None:
    token = issue_token(KEY, "pos-1", "s1", "waiter", 60, "ana", now=time.time())
    claims = verify_token(KEY, token)
    assert claims == Claims("pos-1", "s1", "waiter", claims.expires_at, "ana", claims.issued_at)
    assert claims.issued_at is not None and claims.expires_at - claims.issued_at == 60


def test_error_code_is_4003() -> None:
    with pytest.raises(AuthFailed) as exc:
        verify_token(KEY, "nope")
    assert exc.value.code is Code.AUTH_FAILED and int(exc.value.code) == 4003


def test_rotation_signs_with_the_first_and_accepts_any() -> None:
    token = issue_token(f"{KEY},{OLD}", "pos-1", "s1", "pos", 60)
    jwt.decode(token, KEY, algorithms=["HS256"])
    old_token = issue_token(OLD, "pos-1", "s1", "pos", 60)
    assert verify_token(f"{KEY},{OLD}", old_token).terminal_id == "pos-1"
    assert verify_token([KEY, OLD], old_token).terminal_id == "pos-1"
    with pytest.raises(AuthFailed, match="signature"):
        verify_token(KEY, old_token)


def test_expired_within_the_clock_skew_is_still_fine_beyond_it_not() -> None:
    almost = issue_token(KEY, "p", "s", "pos", 60, now=time.time() - 65)
    verify_token(KEY, almost)
    gone = issue_token(KEY, "p", "s", "pos", 60, now=time.time() - 600)
    with pytest.raises(AuthFailed, match="expired"):
        verify_token(KEY, gone)


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_only_hs256(alg: str) -> None:
    claims = {"sub": "p", "store_id": "s", "terminal_type": "pos", "exp": int(time.time()) + 60}
    token = jwt.encode(claims, KEY * 2, algorithm=alg)
    with pytest.raises(AuthFailed, match="HS256"):
        verify_token(KEY * 2, token)


@given(st.text(max_size=300))
def test_verify_raises_only_auth_failed(garbage: str) -> None:
    with pytest.raises(AuthFailed):
        verify_token(KEY, garbage)


@given(st.binary(max_size=200), st.binary(max_size=200), st.binary(max_size=60))
def test_verify_raises_only_auth_failed_on_jwt_shaped_garbage(
    head: bytes, body: bytes, sig: bytes
) -> None:
    def part(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    with pytest.raises(AuthFailed):
        verify_token(KEY, f"{part(head)}.{part(body)}.{part(sig)}")


def test_keys() -> None:
    assert parse_keys(f" {KEY} ,{OLD}") == (KEY, OLD)
    with pytest.raises(ValueError, match="at least 32 bytes") as exc:
        parse_keys("short-secret")
    assert "short-secret" not in str(exc.value)
    with pytest.raises(ValueError, match="key 2 of 2 is empty"):
        parse_keys(f"{KEY},")
    # Bytes, not characters: 11 three-byte characters are 33 bytes.
    assert parse_keys("€" * 11) == ("€" * 11,)


@pytest.mark.parametrize(
    ("text", "seconds"), [("45", 45), ("45s", 45), ("2m", 120), ("12h", 43200), ("1d", 86400)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1.5h", "-1h", "0", "0s", "12 hours", "1w"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"terminal": "a b"}, "terminal id"),
        ({"store": ""}, "store id"),
        ({"type": "admin"}, "terminal type"),
        ({"ttl": 0}, "ttl"),
        ({"user_id": "u" * 129}, "user id"),
    ],
)
def test_issue_refuses_what_verify_would(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "terminal": "p",
        "store": "s",
        "type": "pos",
        "ttl": 60,
        "user_id": None,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        issue_token(KEY, **args)  # type: ignore[arg-type]


def test_request_token_and_authorize() -> None:
    token = issue_token(KEY, "pos-1", "s1", "kds", 60)
    assert request_token(f"a=1&token={token}", {}) == token
    assert request_token("token=q", {"Authorization": f"Bearer {token}"}) == token
    assert request_token("", {"Authorization": f"bearer   {token} "}) == token
    assert request_token("", {"Authorization": "Basic dXNlcjpwYXNz"}) is None
    assert request_token("", {}) is None
    claims = authenticate(KEY, "", {"Authorization": f"Bearer {token}"})
    assert authorize_terminal(claims, "pos-1", None) == "kds"
    assert authorize_terminal(claims, "pos-1", "kds") == "kds"
    with pytest.raises(AuthFailed):
        authorize_terminal(claims, "pos-1", "pos")
    with pytest.raises(AuthFailed):
        authorize_terminal(claims, "pos-2", None)
    with pytest.raises(AuthFailed, match=r"authentication required"):
        authenticate(KEY, "", {})


def test_redact() -> None:
    token = issue_token(KEY, "pos-1", "s1", "pos", 60)
    for text in (
        f"< GET /ws/pos-1?store_id=s1&token={token}&type=pos HTTP/1.1",
        f"< Authorization: Bearer {token}",
        f"< authorization: bearer {token}",
        f"GET /ws/pos-1?token%3D{token}",
        f"something mentioned {token} in passing",
        "token=opaque-not-a-jwt-secret",
    ):
        clean = redact(text)
        assert "[REDACTED]" in clean
        assert token not in clean and "opaque-not-a-jwt-secret" not in clean
        assert token.split(".")[1] not in clean
    assert redact("GET /ws/pos-1?store_id=s1 HTTP/1.1") == "GET /ws/pos-1?store_id=s1 HTTP/1.1"


def test_filter_rewrites_message_and_traceback() -> None:
    token = issue_token(KEY, "pos-1", "s1", "pos", 60)
    record = logging.LogRecord(
        "websockets.server",
        logging.DEBUG,
        __file__,
        1,
        "< GET %s HTTP/1.1",
        (f"/?token={token}",),
        None,
    )
    assert RedactTokens().filter(record)
    assert token not in record.getMessage()
    try:
        raise ValueError(f"bad path /?token={token}")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert RedactTokens().filter(record)
    assert record.exc_text is not None and token not in record.exc_text
    assert "[REDACTED]" in record.exc_text
