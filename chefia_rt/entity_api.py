"""The entity read API on the WebSocket port (docs/protocol.md §12).

    GET /api/v1/entities/{entity_type}/{entity_id}    one entity, through the RequestCache
    GET /api/v1/entities/{entity_type}?limit=&cursor= a page of a type's entities, from storage

Authorization is the WebSocket's: with JWT_SECRET_KEY the store and the terminal type come from
the token (`Authorization: Bearer` or `?token=`); in open mode from `?store_id=` (default
`default`) and `?type=` (default `pos`). Which types a terminal type may read follows the write
permissions' spirit (READABLE). A read answers `ETag: "<version>"`; `If-None-Match` with it
answers 304, so a terminal revalidates for a few bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from chefia_rt.auth import authenticate
from chefia_rt.cache import entity_fields
from chefia_rt.domain import EntityKey
from chefia_rt.errors import AuthFailed, StorageUnavailable
from chefia_rt.protocol.messages import NAME_PATTERN, TERMINAL_ID_RE, TERMINAL_TYPES

if TYPE_CHECKING:
    from chefia_rt.worker import Worker

log = logging.getLogger("chefia_rt.entity_api")

PREFIX = "/api/v1/entities"
MAX_ENTITY_ID = 128  # as an operation's entity_id
LIST_LIMIT = (100, 500)  # default and largest page
ALL = None
# Entity types each terminal type may read (ALL: every type). Monitors watch everything but
# write nothing; a POS does everything; a waiter needs the menu besides what it writes; a
# kitchen display sees orders and the menu. Nobody but POS and monitors reads cashier data.
READABLE: dict[str, frozenset[str] | None] = {
    "pos": ALL,
    "monitor": ALL,
    "waiter": frozenset({"orders", "tables", "customers", "products", "config"}),
    "kds": frozenset({"orders", "products", "config"}),
}
# Terminals may keep a copy but must revalidate it (cheap with the ETag): the state changes any
# moment. Private: it was read with credentials.
CACHE_CONTROL = "private, no-cache"
_NAME = re.compile(NAME_PATTERN.replace("^", r"\A").replace("$", r"\Z"))
_DIGITS = re.compile(r"\A[0-9]{1,9}\Z")  # ASCII only: "²".isdigit() is true, int("²") fails


class ApiError(Exception):
    """An HTTP error answer: status, a stable machine code, and a sentence for people."""

    def __init__(self, status: int, code: str, error: str, headers: dict[str, str] | None = None):
        super().__init__(error)
        self.status = status
        self.code = code
        self.error = error
        self.headers = headers or {}


def is_entity_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def _response(status: int, body: bytes, headers: dict[str, str]) -> Response:
    all_headers = Headers(
        {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}
    )
    return Response(status, HTTPStatus(status).phrase, all_headers, body)


def _error(exc: ApiError) -> Response:
    body = json.dumps({"error": exc.error, "code": exc.code, "status": exc.status}).encode()
    return _response(exc.status, body, {"Cache-Control": "no-store", **exc.headers})


async def handle(worker: Worker, request: Request) -> Response:
    """Answer a GET under /api/v1/entities."""
    url = urlsplit(request.path)
    try:
        query = parse_qs(url.query, keep_blank_values=True)
        store_id, terminal_type = _reader(worker, url.query, query, request)
        entity_type, entity_id = _target(url.path)
        readable = READABLE.get(terminal_type, frozenset())
        if readable is not ALL and entity_type not in readable:
            raise ApiError(
                403, "forbidden", f"a {terminal_type} terminal may not read {entity_type}"
            )
        if entity_id is None:
            return await _list(worker, store_id, entity_type, query)
        return await _one(worker, EntityKey(store_id, entity_type, entity_id), request)
    except ApiError as exc:
        return _error(exc)
    except StorageUnavailable as exc:
        return _error(ApiError(503, "unavailable", exc.reason, {"Retry-After": "1"}))
    except Exception:
        log.exception("HTTP %s failed", url.path)
        return _error(ApiError(500, "internal", "internal error"))


def _reader(
    worker: Worker, raw_query: str, query: dict[str, list[str]], request: Request
) -> tuple[str, str]:
    """(store_id, terminal_type) of the caller, as a WebSocket handshake would decide them."""
    if worker.settings.auth_enabled:
        try:
            claims = authenticate(worker.settings.jwt_keys, raw_query, request.headers)
        except AuthFailed as exc:
            bearer = {"WWW-Authenticate": "Bearer"}
            raise ApiError(401, "unauthorized", exc.reason, bearer) from None
        return claims.store_id, claims.terminal_type
    store_id = _one_value(query, "store_id") or "default"
    if not TERMINAL_ID_RE.match(store_id):
        raise ApiError(400, "invalid_store_id", "store_id: 1-64 characters of [A-Za-z0-9._:-]")
    terminal_type = _one_value(query, "type") or "pos"
    if terminal_type not in TERMINAL_TYPES:
        raise ApiError(400, "invalid_terminal_type", f"invalid terminal type {terminal_type!r}")
    return store_id, terminal_type


def _target(path: str) -> tuple[str, str | None]:
    """(entity_type, entity_id or None for the list) of a path under PREFIX."""
    rest = path[len(PREFIX) + 1 :]
    raw_type, slash, raw_id = rest.partition("/")
    entity_type = _unquote(raw_type, "entity_type")
    if not _NAME.match(entity_type) or len(entity_type) > 64:
        raise ApiError(
            400, "invalid_entity_type", "entity_type: 1-64 characters of [A-Za-z0-9._:-]"
        )
    if not slash:
        return entity_type, None
    entity_id = _unquote(raw_id, "entity_id")
    if not 1 <= len(entity_id) <= MAX_ENTITY_ID or "\x00" in entity_id:
        raise ApiError(
            400,
            "invalid_entity_id",
            f"entity_id: 1-{MAX_ENTITY_ID} characters, no NUL (percent-encode a '/' in it)",
        )
    return entity_type, entity_id


def _unquote(raw: str, what: str) -> str:
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise ApiError(400, f"invalid_{what}", f"{what}: not UTF-8 once percent-decoded") from None


def _one_value(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, "invalid_query", f"{name} given more than once")
    return values[0]


async def _one(worker: Worker, key: EntityKey, request: Request) -> Response:
    found = await worker.cache.read(key)
    if found is None:
        raise ApiError(404, "not_found", f"no {key.entity_type} {key.entity_id!r} in this store")
    etag = f'"{found.version}"'
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL, "Vary": "Authorization"}
    if _matches(request.headers.get_all("If-None-Match"), etag):
        # No body and no Content-Length: a 304's would have to be the 200's (RFC 9110).
        return Response(304, "Not Modified", Headers(headers), b"")
    return _response(200, found.body, headers)


def _matches(if_none_match: list[str], etag: str) -> bool:
    """RFC 9110 If-None-Match: weak comparison against a list of tags, or `*`."""
    for header in if_none_match:
        for tag in header.split(","):
            tag = tag.strip()
            if tag == "*" or tag.removeprefix("W/") == etag:
                return True
    return False


async def _list(
    worker: Worker, store_id: str, entity_type: str, query: dict[str, list[str]]
) -> Response:
    limit_text = _one_value(query, "limit")
    limit = LIST_LIMIT[0]
    if limit_text is not None:
        if not _DIGITS.match(limit_text) or not 1 <= int(limit_text) <= LIST_LIMIT[1]:
            raise ApiError(400, "invalid_limit", f"limit: an integer from 1 to {LIST_LIMIT[1]}")
        limit = int(limit_text)
    cursor = _one_value(query, "cursor")
    after = _decode_cursor(cursor) if cursor else None
    # Straight from storage: a read that starts after the request sees every confirmed write.
    entities = await worker.store.list_entities(store_id, entity_type, after, limit)
    last = entities[-1].key.entity_id if len(entities) == limit else None
    body: dict[str, Any] = {
        "entity_type": entity_type,
        "entities": [entity_fields(e) for e in entities],
        "count": len(entities),
        "next_cursor": _encode_cursor(last) if last is not None else None,
    }
    payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return _response(200, payload, {"Cache-Control": "no-store", "Vary": "Authorization"})


def _encode_cursor(entity_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([entity_id]).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        (entity_id,) = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, TypeError, binascii.Error, UnicodeError):
        raise ApiError(400, "invalid_cursor", "cursor: pass next_cursor back unchanged") from None
    if not isinstance(entity_id, str) or "\x00" in entity_id:
        raise ApiError(400, "invalid_cursor", "cursor: pass next_cursor back unchanged")
    return entity_id
