"""Encryption of backup archives with ENCRYPTION_KEY (docs/operations.md §2.1).

An archive made with a key keeps its tar structure and its manifest in clear (what a restore
must know before anything else: format, tables, row counts, checksums), and stores every table
member encrypted:

- the key: scrypt(ENCRYPTION_KEY, a random 16-byte salt per archive, n=2^15, r=8, p=1), 32 bytes;
- the cipher: AES-256-GCM (authenticated), over the member's gzip stream cut into chunks of
  `chunk_bytes`, each stored as its ciphertext and 16-byte tag. A chunk's 12-byte nonce is the
  member's number (4 bytes), the chunk's number (7 bytes) and 1 for the last chunk, else 0; the
  member's name is the associated data. So a chunk cannot be altered, moved, dropped or cut off
  after, and a member cannot pass for another;
- the manifest's `encryption` object says all this (algorithm, kdf and its parameters, salt,
  chunk size) plus `key_check`: a known text encrypted with the key, which tells a wrong key
  from a damaged archive before any member is read.

The manifest's sizes and sha256 are those of the stored (encrypted) bytes: damage is found
without the key, as for a plain archive.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from typing import IO, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

ALGORITHM = "AES-256-GCM"
KDF = "scrypt"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
CHUNK_BYTES = 1 << 16
TAG_BYTES = 16
_KEY_CHECK_TEXT = b"chefia-rt backup key check"
_KEY_CHECK_MEMBER = 0xFFFFFFFF  # a member number no table has
_MAX_CHUNKS = 1 << 56  # the chunk number's 7 bytes


class WrongKey(Exception):
    """ENCRYPTION_KEY is not the key the archive was made with."""


class DecryptionFailed(Exception):
    """A chunk does not authenticate: the stored bytes were changed or cut."""


def _derive(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


def _nonce(member: int, chunk: int, last: bool) -> bytes:
    if chunk >= _MAX_CHUNKS:
        raise ValueError("member too large for its chunk counter")
    return member.to_bytes(4, "big") + chunk.to_bytes(7, "big") + (b"\1" if last else b"\0")


@dataclass(frozen=True, slots=True)
class ArchiveKey:
    """One archive's key and the manifest description of how it was made."""

    aead: AESGCM
    description: dict[str, Any]

    @classmethod
    def new(cls, passphrase: str) -> ArchiveKey:
        salt = os.urandom(16)
        key = AESGCM(_derive(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P))
        check = key.encrypt(_nonce(_KEY_CHECK_MEMBER, 0, True), _KEY_CHECK_TEXT, b"key-check")
        description = {
            "algorithm": ALGORITHM,
            "kdf": KDF,
            "kdf_params": {"n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
            "salt": base64.b64encode(salt).decode(),
            "chunk_bytes": CHUNK_BYTES,
            "key_check": base64.b64encode(check).decode(),
        }
        return cls(key, description)

    @classmethod
    def from_manifest(cls, description: Any, passphrase: str) -> ArchiveKey:
        """The key of an archive whose manifest says `description`. ValueError when the
        description is not one this version knows; WrongKey when the passphrase is wrong."""
        try:
            if description["algorithm"] != ALGORITHM or description["kdf"] != KDF:
                raise ValueError(
                    f"encrypted with {description['algorithm']}/{description['kdf']}, which "
                    f"this chefia-rt does not know ({ALGORITHM}/{KDF})"
                )
            params = description["kdf_params"]
            n, r, p = int(params["n"]), int(params["r"]), int(params["p"])
            if not (2 <= n <= 2**20 and 1 <= r <= 32 and 1 <= p <= 16) or n & (n - 1):
                raise ValueError("implausible scrypt parameters")
            salt = base64.b64decode(description["salt"], validate=True)
            check = base64.b64decode(description["key_check"], validate=True)
            chunk = int(description["chunk_bytes"])
            if not 1024 <= chunk <= 1 << 24:
                raise ValueError("implausible chunk size")
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the manifest's encryption is not readable: {exc}") from None
        key = AESGCM(_derive(passphrase, salt, n, r, p))
        try:
            key.decrypt(_nonce(_KEY_CHECK_MEMBER, 0, True), check, b"key-check")
        except InvalidTag:
            raise WrongKey from None
        return cls(key, description)

    @property
    def chunk_bytes(self) -> int:
        return int(self.description["chunk_bytes"])


class EncryptingWriter:
    """A write-only file: what is written goes to `raw` as authenticated chunks."""

    def __init__(self, key: ArchiveKey, member: int, name: str, raw: IO[bytes] | Any) -> None:
        self._key, self._member, self._aad, self._raw = key, member, name.encode(), raw
        self._buffer = bytearray()
        self._chunk = 0

    def _emit(self, data: bytes, last: bool) -> None:
        nonce = _nonce(self._member, self._chunk, last)
        self._raw.write(self._key.aead.encrypt(nonce, data, self._aad))
        self._chunk += 1

    def write(self, data: bytes) -> int:
        self._buffer += data
        size = self._key.chunk_bytes
        # The last chunk is marked: keep back at least one byte until close().
        while len(self._buffer) > size:
            self._emit(bytes(self._buffer[:size]), False)
            del self._buffer[:size]
        return len(data)

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        """The last chunk (possibly empty). Does not close `raw`."""
        self._emit(bytes(self._buffer), True)
        self._buffer.clear()


class DecryptingReader:
    """A read-only file: the plain bytes of a member stored by EncryptingWriter."""

    def __init__(self, key: ArchiveKey, member: int, name: str, raw: IO[bytes] | Any) -> None:
        self._key, self._member, self._aad, self._raw = key, member, name.encode(), raw
        self._stored = key.chunk_bytes + TAG_BYTES
        self._next: bytes = raw.read(self._stored)
        self._chunk = 0
        self._plain = b""
        self._done = False

    def _pull(self) -> None:
        current, self._next = self._next, self._raw.read(self._stored)
        last = not self._next
        if len(current) < TAG_BYTES:
            raise DecryptionFailed("the member ends before its last chunk (truncated)")
        try:
            self._plain = self._key.aead.decrypt(
                _nonce(self._member, self._chunk, last), current, self._aad
            )
        except InvalidTag:
            raise DecryptionFailed(f"chunk {self._chunk} does not authenticate") from None
        self._chunk += 1
        self._done = last

    def read(self, size: int = -1) -> bytes:
        parts = []
        wanted = size if size >= 0 else 1 << 62
        while wanted > 0:
            if not self._plain:
                if self._done:
                    break
                self._pull()
                continue
            part, self._plain = self._plain[:wanted], self._plain[wanted:]
            parts.append(part)
            wanted -= len(part)
        return b"".join(parts)
