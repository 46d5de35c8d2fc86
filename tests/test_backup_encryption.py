"""Encrypted backup archives (ENCRYPTION_KEY): real archives of a populated database, read back
by chefia-rt with the right key, refused without it or with a wrong one, and decrypted here
independently (cryptography, tarfile, gzip only) by the format docs/operations.md §2.1
and chefia_rt/archive_crypto.py describe, so that an archive stays readable without this code."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from chefia_rt.backup import BackupError, create_backup, restore_archive, verify_archive
from chefia_rt.config import load_settings
from tests.test_backup import (
    QUIET,
    Databases,
    cli,
    dump,
    flip,
    members,
    one_line,
    populated,
    read_archive,
)

KEY = "correct horse battery staple 42"
WRONG = "correct horse battery staple 43"


async def _no_postgres() -> str:
    raise AssertionError("these tests use SQLite only")


@pytest.fixture
def databases(tmp_path: Path) -> Databases:
    return Databases(tmp_path, _no_postgres)


def decrypt_member(manifest: dict[str, Any], number: int, name: str, stored: bytes) -> bytes:
    """A member's gzip bytes, by the documented format alone."""
    spec = manifest["encryption"]
    assert spec["algorithm"] == "AES-256-GCM" and spec["kdf"] == "scrypt"
    params = spec["kdf_params"]
    salt = base64.b64decode(spec["salt"])
    key = Scrypt(salt=salt, length=32, n=params["n"], r=params["r"], p=params["p"]).derive(
        KEY.encode()
    )
    aead = AESGCM(key)
    size = spec["chunk_bytes"] + 16
    chunks = [stored[i : i + size] for i in range(0, len(stored), size)] or [b""]
    plain = b""
    for index, chunk in enumerate(chunks):
        last = index == len(chunks) - 1
        nonce = number.to_bytes(4, "big") + index.to_bytes(7, "big") + bytes([last])
        plain += aead.decrypt(nonce, chunk, name.encode())
    return plain


async def encrypted_and_plain(databases: Databases) -> tuple[str, Path, Path]:
    url = await databases.url("sqlite")
    await populated(url)
    plain = await create_backup(databases.settings(url), progress=QUIET)
    sealed = await create_backup(databases.settings(url, encryption_key=KEY), progress=QUIET)
    return url, plain.path, sealed.path


async def test_an_encrypted_archive_holds_no_clear_data_and_decrypts_by_its_manifest(
    databases: Databases,
) -> None:
    _, plain_path, sealed_path = await encrypted_and_plain(databases)
    plain_manifest, plain_rows = read_archive(plain_path)
    assert plain_manifest["format_version"] == 1 and "encryption" not in plain_manifest
    with tarfile.open(sealed_path, "r:") as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        stored = {n: tar.extractfile(n).read() for n in names[1:]}  # type: ignore[union-attr]
    assert manifest["format_version"] == 2
    assert manifest["encryption"]["algorithm"] == "AES-256-GCM"
    assert manifest["encryption"]["kdf"] == "scrypt" and manifest["encryption"]["salt"]
    assert names[1:] == list(plain_manifest["members"])
    sealed_rows = {}
    for number, name in enumerate(names[1:]):
        data = stored[name]
        assert not data.startswith(b"\x1f\x8b"), f"{name} is stored as plain gzip"
        table = name.removesuffix(".jsonl.gz")
        for row in plain_rows[table][:3]:  # no row's text appears in clear
            for value in row.values():
                if isinstance(value, str) and len(value) > 8:
                    assert value.encode() not in data, (name, value)
        lines = gzip.decompress(decrypt_member(manifest, number, name, data)).splitlines()
        sealed_rows[table] = [json.loads(line) for line in lines]
    assert {t: len(r) for t, r in sealed_rows.items()} == {t: len(r) for t, r in plain_rows.items()}
    assert sum(map(len, sealed_rows.values())) > 10


async def test_verify_and_restore_need_the_key_and_refuse_a_wrong_one(
    databases: Databases,
) -> None:
    url, plain_path, sealed_path = await encrypted_and_plain(databases)
    verified = await asyncio.to_thread(verify_archive, sealed_path, QUIET, KEY)
    assert "ok (encrypted AES-256-GCM, format 2" in verified.describe()
    with pytest.raises(BackupError, match=r"the archive is encrypted .*set ENCRYPTION_KEY"):
        await asyncio.to_thread(verify_archive, sealed_path, QUIET)
    with pytest.raises(BackupError, match="ENCRYPTION_KEY is not the key this archive"):
        await asyncio.to_thread(verify_archive, sealed_path, QUIET, WRONG)
    # A plain archive needs no key, and a key configured does not stop it being read.
    assert verify_archive(plain_path, QUIET, KEY).manifest.format_version == 1

    target = await databases.url("sqlite")
    with pytest.raises(BackupError, match="ENCRYPTION_KEY is not the key"):
        await restore_archive(load_settings(database_url=target, encryption_key=WRONG), sealed_path)
    assert not await asyncio.to_thread(Path(target.removeprefix("sqlite:///")).exists)
    await restore_archive(
        load_settings(database_url=target, encryption_key=KEY), sealed_path, progress=QUIET
    )
    assert await dump(target) == await dump(url)


async def test_damage_to_an_encrypted_member_is_found(databases: Databases) -> None:
    _, _, sealed_path = await encrypted_and_plain(databases)
    entities = members(sealed_path)["entities.jsonl.gz"]
    flip(sealed_path, entities.offset_data + 40)
    with pytest.raises(BackupError, match=r"checksum mismatch in entities\.jsonl\.gz"):
        await asyncio.to_thread(verify_archive, sealed_path, QUIET, KEY)


async def test_cli_encrypts_with_the_configured_key(tmp_path: Path, databases: Databases) -> None:
    url = await databases.url("sqlite")
    await populated(url)
    env = {"DATABASE_URL": url, "BACKUP_DIR": str(tmp_path / "nightly"), "ENCRYPTION_KEY": KEY}
    made = await asyncio.to_thread(cli, "backup", cwd=tmp_path, **env)
    assert made.returncode == 0, made.stderr
    path = Path(one_line(made.stdout))
    assert ", encrypted AES-256-GCM: 6 tables" in made.stderr
    checked = await asyncio.to_thread(
        cli, "backup", "--verify", str(path), cwd=tmp_path, ENCRYPTION_KEY=KEY
    )
    assert checked.returncode == 0 and "ok (encrypted AES-256-GCM" in checked.stdout
    keyless = await asyncio.to_thread(cli, "backup", "--verify", str(path), cwd=tmp_path)
    assert keyless.returncode == 1
    assert "set ENCRYPTION_KEY" in one_line(keyless.stderr)
    wrong = await asyncio.to_thread(
        cli, "restore", str(path), cwd=tmp_path, ENCRYPTION_KEY=WRONG,
        DATABASE_URL=f"sqlite:///{tmp_path / 'other.db'}",
    )  # fmt: skip
    assert wrong.returncode == 1 and "not the key this archive" in one_line(wrong.stderr)
    short = await asyncio.to_thread(cli, "backup", cwd=tmp_path, **(env | {"ENCRYPTION_KEY": "x"}))
    assert short.returncode == 1
    assert "ENCRYPTION_KEY: must be at least 16 characters" in one_line(short.stderr)
    assert "'x'" not in short.stderr  # a secret is never repeated
