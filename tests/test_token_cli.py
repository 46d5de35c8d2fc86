"""`chefia-rt token` (docs/security.md §2, docs/operations.md §1): prints a JWT the server accepts;
exit 1 without a key, 2 on usage errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

from chefia_rt.cli import main
from tests.helpers import running_server

KEY = "token-cli-test-key-0123456789abcdef-0123456789"
OLD_KEY = "token-cli-old-key-fedcba9876543210-fedcba98765"
_OURS = ("WS_", "MAX_WS_", "DATABASE_URL", "REDIS_URL", "JWT_", "BACKUP_", "METRICS_", "SYNC_")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A clean environment (no settings of the test run, no .env) with JWT_SECRET_KEY set."""
    for name in list(os.environ):
        if name.upper().startswith(_OURS):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JWT_SECRET_KEY", KEY)
    return monkeypatch


def issue(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["token", *args]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == 1, out
    return lines[0]


def decode(token: str, key: str = KEY) -> dict[str, object]:
    claims: dict[str, object] = jwt.decode(token, key, algorithms=["HS256"])
    return claims


def test_prints_a_token_with_the_claims(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = int(time.time())
    token = issue(capsys, "--terminal", "pos-001", "--store", "loja-centro", "--type", "pos")
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = decode(token)
    assert claims["sub"] == "pos-001"
    assert claims["store_id"] == "loja-centro"
    assert claims["terminal_type"] == "pos"
    assert "user_id" not in claims
    iat, exp = claims["iat"], claims["exp"]
    assert isinstance(iat, int) and isinstance(exp, int)
    assert before <= iat <= time.time()
    assert exp - iat == 12 * 3600  # the default ttl


def test_user_and_type(env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    token = issue(
        capsys, "--terminal", "kds-1", "--store", "s1", "--type", "kds", "--user", "chef-ana"
    )
    claims = decode(token)
    assert claims["terminal_type"] == "kds"
    assert claims["user_id"] == "chef-ana"


@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("12h", 43_200), ("7d", 604_800), ("2H", 7200)],
)
def test_ttl_suffixes(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], ttl: str, seconds: int
) -> None:
    claims = decode(
        issue(capsys, "--terminal", "p1", "--store", "s1", "--type", "pos", "--ttl", ttl)
    )
    assert claims["exp"] - claims["iat"] == seconds  # type: ignore[operator]


def test_signed_with_the_first_of_several_keys(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("JWT_SECRET_KEY", f"{KEY},{OLD_KEY}")
    token = issue(capsys, "--terminal", "p1", "--store", "s1", "--type", "waiter")
    decode(token, KEY)
    with pytest.raises(jwt.InvalidSignatureError):
        decode(token, OLD_KEY)


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--store", "s1", "--type", "pos"],
        ["--terminal", "p1", "--type", "pos"],
        ["--terminal", "p1", "--store", "s1"],
        ["--terminal", "p1", "--store", "s1", "--type", "toaster"],
        ["--terminal", "p 1", "--store", "s1", "--type", "pos"],
        ["--terminal", "x" * 65, "--store", "s1", "--type", "pos"],
        ["--terminal", "p1", "--store", "s/1", "--type", "pos"],
        ["--terminal", "p1", "--store", "s1", "--type", "pos", "--ttl", "12x"],
        ["--terminal", "p1", "--store", "s1", "--type", "pos", "--ttl", "0h"],
        ["--terminal", "p1", "--store", "s1", "--type", "pos", "--ttl", "-5m"],
        ["--terminal", "p1", "--store", "s1", "--type", "pos", "--user", "u" * 129],
        ["--terminal", "p1", "--store", "s1", "--type", "pos", "--bogus"],
    ],
)
def test_usage_errors_exit_2(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["token", *args])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "usage: chefia-rt" in err


def test_without_a_key_exit_1_with_one_line(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env.delenv("JWT_SECRET_KEY")
    assert main(["token", "--terminal", "p1", "--store", "s1", "--type", "pos"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "JWT_SECRET_KEY is not set" in err


def test_short_key_exit_1_without_echoing_it(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("JWT_SECRET_KEY", "hunter2")
    assert main(["token", "--terminal", "p1", "--store", "s1", "--type", "pos"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "JWT_SECRET_KEY" in err and "32 bytes" in err
    assert "hunter2" not in err


def _subprocess_env(**extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith(_OURS)}
    environ.update(extra)
    return environ


def test_the_installed_command(tmp_path: Path) -> None:
    """Through a real process: stdout is the token alone, exit codes as docs/operations.md §1
    says."""
    args = ["token", "--terminal", "pos-1", "--store", "s1", "--type", "monitor", "--ttl", "1d"]
    ok = subprocess.run(
        [sys.executable, "-m", "chefia_rt", *args],
        cwd=tmp_path,
        env=_subprocess_env(JWT_SECRET_KEY=KEY),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    assert decode(ok.stdout.strip())["terminal_type"] == "monitor"
    assert ok.stdout.count("\n") == 1
    missing = subprocess.run(
        [sys.executable, "-m", "chefia_rt", *args],
        cwd=tmp_path,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert len(missing.stderr.strip().splitlines()) == 1
    usage = subprocess.run(
        [sys.executable, "-m", "chefia_rt", "token", "--terminal", "pos-1"],
        cwd=tmp_path,
        env=_subprocess_env(JWT_SECRET_KEY=KEY),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert usage.returncode == 2


async def test_a_printed_token_opens_a_connection(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    token = issue(capsys, "--terminal", "waiter-7", "--store", "loja-1", "--type", "waiter")
    async with running_server(tmp_path, jwt_secret_key=KEY) as server:
        terminal = await server.connect("waiter-7", store="ignored", type="waiter", token=token)
        try:
            assert terminal.established["store_id"] == "loja-1"
            assert terminal.established["terminal_type"] == "waiter"
        finally:
            await terminal.close()
