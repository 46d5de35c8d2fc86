"""Locust load test: POS terminals speaking chefia-rt's binary protocol.

    locust -f loadtest/locustfile.py --headless -u 1000 -r 100 -t 60s \
        --host ws://127.0.0.1:8001 --op-rate 0.5 --terminals-per-store 10 --processes 2

Each Locust user is one `pos` terminal holding one WebSocket (msgpack encoding). Users are
grouped into stores by their index (`--terminals-per-store`, 10 by default, so 1000 users are
100 restaurants of 10 terminals). Each terminal sends `UPDATE`s of its own tables (no lock is
needed for `tables`) at `--op-rate` operations per second, and reads everything the server sends
(msgpack frames, `message_batch`, `compressed:` + lz4).

Reported through Locust's request events, so they show in its statistics (type "ws"):
- "connect": the handshake up to `connection_established`;
- "ack": from sending a `data_sync` to its `sync_confirmation` (the confirmation latency);
- "push": from the sending terminal's clock at send time to the moment another terminal of the
  store receives the pushed operation (the propagation latency; all users of one store live in
  one Locust process and every process of this machine shares one clock).
Failures: a `sync_error`, a `sync_conflict`, a confirmation not received within `--ack-timeout`,
a connection that could not be opened or was closed by the server.

Options (also as environment variables): --op-rate (CHEFIA_LOAD_OP_RATE), --terminals-per-store
(CHEFIA_LOAD_TERMINALS_PER_STORE), --store-prefix (CHEFIA_LOAD_STORE_PREFIX), --ack-timeout
(CHEFIA_LOAD_ACK_TIMEOUT), --connect-timeout (CHEFIA_LOAD_CONNECT_TIMEOUT), --jwt-secret
(CHEFIA_LOAD_JWT_SECRET: sign a token per terminal when the server runs with JWT_SECRET_KEY;
the key never goes on a command line that `ps` shows).

Locust runs users as gevent greenlets, so the WebSocket client is websocket-client (blocking
sockets that gevent's monkey patching makes cooperative), not an asyncio library.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import gevent
import msgpack
import websocket
from locust import User, events, task
from locust.env import Environment

from chefia_rt.auth import issue_token, parse_keys
from chefia_rt.protocol.codec import decode_frame
from chefia_rt.protocol.messages import format_timestamp

MAX_FRAME = 16 * 1024 * 1024  # what this client accepts after inflation
TABLES_PER_TERMINAL = 4
STATUSES = ("free", "occupied", "ordering", "eating", "paying")
# Users started in this process. With --processes, Locust imports this file once and then forks:
# every process counts from 0 again, so ids also carry the process id (read at user start, after
# the fork), which keeps terminals and stores of different processes apart.
_user_numbers = itertools.count()


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument(
        "--op-rate",
        type=float,
        default=1.0,
        env_var="CHEFIA_LOAD_OP_RATE",
        help="data_sync operations per second per terminal (default 1)",
    )
    parser.add_argument(
        "--terminals-per-store",
        type=int,
        default=10,
        env_var="CHEFIA_LOAD_TERMINALS_PER_STORE",
        help="consecutive users sharing one store (default 10)",
    )
    parser.add_argument(
        "--store-prefix",
        default="",
        env_var="CHEFIA_LOAD_STORE_PREFIX",
        help="store ids are PREFIX-PID-N (default: a fresh prefix per run)",
    )
    parser.add_argument(
        "--ack-timeout",
        type=float,
        default=10.0,
        env_var="CHEFIA_LOAD_ACK_TIMEOUT",
        help="seconds before an unconfirmed operation counts as a failure (default 10)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        env_var="CHEFIA_LOAD_CONNECT_TIMEOUT",
        help="seconds for the handshake up to connection_established (default 30)",
    )
    parser.add_argument(
        "--jwt-secret",
        default="",
        env_var="CHEFIA_LOAD_JWT_SECRET",
        is_secret=True,
        help="the server's JWT_SECRET_KEY, to sign a token per terminal (default: open mode)",
    )


_run_prefix = f"load-{uuid.uuid4().hex[:6]}"


class AckTimeout(Exception):
    """A data_sync was not answered within --ack-timeout."""


class ServerRefused(Exception):
    """The server answered sync_error or sync_conflict."""


class PosTerminal(User):
    """One POS terminal of a store: sends UPDATEs of its own tables, reads every push."""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        options = environment.parsed_options
        self.op_rate: float = options.op_rate if options else 1.0
        self.ack_timeout: float = options.ack_timeout if options else 10.0
        self.connect_timeout: float = options.connect_timeout if options else 30.0
        per_store: int = max(1, options.terminals_per_store if options else 10)
        prefix: str = (options.store_prefix if options else "") or _run_prefix
        secret: str = options.jwt_secret if options else ""
        process = os.getpid()
        number = next(_user_numbers)
        self.terminal_id = f"pos-{process}-{number}"
        self.store_id = f"{prefix}-{process}-{number // per_store}"
        self.token = (
            issue_token(parse_keys(secret), self.terminal_id, self.store_id, "pos", 3600, None)
            if secret
            else None
        )
        self.ws: websocket.WebSocket | None = None
        self.reader: gevent.Greenlet | None = None
        # op id -> (perf_counter at send, frame size); answered ones are removed.
        self.pending: dict[str, tuple[float, int]] = {}
        self.versions: dict[str, int] = {}
        self.sent = 0
        self.stopping = False

    def wait_time(self) -> float:
        """Open loop at --op-rate: one operation every 1/rate seconds (sending takes ~0)."""
        return 1.0 / self.op_rate if self.op_rate > 0 else 3600.0

    # ---- connection ------------------------------------------------------------------------

    def on_start(self) -> None:
        host = (self.host or "ws://127.0.0.1:8001").rstrip("/")
        host = host.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        if not host.startswith(("ws://", "wss://")):
            host = f"ws://{host}"
        query = {"type": "pos", "encoding": "msgpack", "store_id": self.store_id}
        url = f"{host}/ws/{self.terminal_id}?{urlencode(query)}"
        headers = [f"Authorization: Bearer {self.token}"] if self.token else []
        started = time.perf_counter()
        try:
            ws = websocket.create_connection(url, header=headers, timeout=self.connect_timeout)
            first = ws.recv()
            if not first:  # websocket-client's answer to a close frame
                raise ServerRefused(f"closed before connection_established ({ws.status})")
            hello = self._messages(first)
            if hello[0].get("type") != "connection_established":
                raise ServerRefused(f"expected connection_established, got {hello[:1]}")
        except Exception as exc:
            self._report("connect", started, 0, exc)
            raise
        self._report("connect", started, 0, None)
        # Reads block in the reader greenlet (no timeout: a timeout in the middle of a frame
        # would lose its start); sends and the --ack-timeout check happen in the task greenlet.
        ws.settimeout(None)
        self.ws = ws
        self.stopping = False
        self.reader = gevent.spawn(self._read_loop)

    def on_stop(self) -> None:
        self.stopping = True
        if self.reader is not None:
            self.reader.kill(block=False)
        if self.ws is not None:
            try:
                self.ws.close(timeout=1)
            except Exception:
                self.ws.shutdown()
        self.pending.clear()

    # ---- sending ---------------------------------------------------------------------------

    @task
    def update_table(self) -> None:
        """One UPDATE of one of this terminal's own tables, version = the last known + 1."""
        if self.ws is None:
            return
        self._expire()
        table = f"{self.terminal_id}-t{self.sent % TABLES_PER_TERMINAL}"
        version = self.versions.get(table, 0) + 1
        # Counted as the next version at once: this terminal is the table's only writer and the
        # server applies one connection's operations in order.
        self.versions[table] = version
        op_id = f"{self.terminal_id}-{uuid.uuid4().hex[:12]}"
        self.sent += 1
        frame = msgpack.packb(
            {
                "type": "data_sync",
                "operation": {
                    "id": op_id,
                    "entity_type": "tables",
                    "entity_id": table,
                    "operation": "UPDATE",
                    "data": {
                        "status": STATUSES[self.sent % len(STATUSES)],
                        "guests": self.sent % 8 + 1,
                        # Wall clock at send: the receivers' propagation latency starts here.
                        "sent_at": time.time(),
                    },
                    "version": version,
                    "timestamp": format_timestamp(datetime.now(UTC)),
                    "priority": "medium",
                },
            }
        )
        started = time.perf_counter()
        self.pending[op_id] = (started, len(frame))
        try:
            self.ws.send_binary(frame)
        except Exception as exc:
            self.pending.pop(op_id, None)
            self._report("ack", started, len(frame), exc)
            self._reconnect()

    # ---- receiving -------------------------------------------------------------------------

    def _read_loop(self) -> None:
        ws = self.ws
        assert ws is not None
        while True:
            try:
                frame = ws.recv()
            except Exception as exc:
                # Closed under us by the server is a failure; by on_stop it is the end of the run.
                if not self.stopping:
                    self._report("connection", time.perf_counter(), 0, exc)
                return
            if not frame:
                # websocket-client answers a close frame with an empty message.
                if not self.stopping:
                    self._report("connection", time.perf_counter(), 0, ServerRefused("closed"))
                return
            received_wall, received = time.time(), time.perf_counter()
            size = len(frame)
            for message in self._messages(frame):
                self._handle(message, received_wall, received, size)

    @staticmethod
    def _messages(frame: str | bytes) -> list[dict[str, Any]]:
        return decode_frame(frame, MAX_FRAME)

    def _handle(self, message: dict[str, Any], wall: float, now: float, size: int) -> None:
        kind = message.get("type")
        if kind == "sync_confirmation":
            op_id = message.get("operation_id", "")
            sent = self.pending.pop(op_id, None)
            if sent is None:
                return
            if message.get("status") != "applied" and message.get("version") is not None:
                # Our count was off (a resolved conflict): take the server's version.
                self.versions[str(message.get("entity_id"))] = int(message["version"])
            self._report("ack", sent[0], size, None, now)
        elif kind in ("sync_error", "sync_conflict"):
            op_id = message.get("operation_id", "")
            sent = self.pending.pop(op_id, None)
            started = sent[0] if sent is not None else now
            reason = message.get("error") or message.get("reason") or kind
            refused = ServerRefused(f"{kind} {message.get('code')}: {reason}")
            self._report("ack", started, size, refused, now)
        elif kind == "data_sync":
            operation = message.get("operation") or {}
            data = operation.get("data") or {}
            sent_at = data.get("sent_at")
            if isinstance(sent_at, float):
                events.request.fire(
                    request_type="ws",
                    name="push",
                    response_time=max(0.0, (wall - sent_at) * 1000),
                    response_length=size,
                    exception=None,
                    context={},
                )

    def _expire(self) -> None:
        """Count operations unanswered past --ack-timeout as failures (once each)."""
        now = time.perf_counter()
        late = [op for op, (sent, _) in self.pending.items() if now - sent > self.ack_timeout]
        for op_id in late:
            sent, size = self.pending.pop(op_id)
            self._report("ack", sent, size, AckTimeout(f"no answer within {self.ack_timeout}s"))

    def _reconnect(self) -> None:
        self.on_stop()
        self.ws = None
        self.on_start()

    def _report(
        self,
        name: str,
        started: float,
        size: int,
        exception: BaseException | None,
        now: float | None = None,
    ) -> None:
        elapsed = ((now if now is not None else time.perf_counter()) - started) * 1000
        events.request.fire(
            request_type="ws",
            name=name,
            response_time=elapsed,
            response_length=size,
            exception=exception,
            context={"terminal": self.terminal_id, "store": self.store_id},
        )
