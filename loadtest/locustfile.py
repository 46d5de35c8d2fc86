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
- "generator" (type "lag"): how late this Locust process's own event loop ran, sampled 4 times a
  second. When it is as large as the ack and push latencies, the load generator was short of CPU
  and those latencies are its own, not the server's.
Failures: a `sync_error`, a `sync_conflict`, a confirmation not received within `--ack-timeout`,
a connection that could not be opened ("connect") or that the server closed ("connection", with
its close code and reason; the operations it left unanswered fail with it). A terminal whose
connection failed connects again at its next operation, as a POS terminal does.

`--totals-dir DIR` (CHEFIA_LOAD_TOTALS_DIR): every Locust process that ran terminals writes its
counts (operations sent, confirmed, refused, timed out, lost with a connection, unanswered when
the run stopped) to DIR/totals-PID.json when the run stops, so a run can be checked against the
server's operation log without the gap of Locust's last statistics report.

Options (also as environment variables): --op-rate (CHEFIA_LOAD_OP_RATE), --terminals-per-store
(CHEFIA_LOAD_TERMINALS_PER_STORE), --store-prefix (CHEFIA_LOAD_STORE_PREFIX), --ack-timeout
(CHEFIA_LOAD_ACK_TIMEOUT), --connect-timeout (CHEFIA_LOAD_CONNECT_TIMEOUT), --jwt-secret
(CHEFIA_LOAD_JWT_SECRET: sign a token per terminal when the server runs with JWT_SECRET_KEY;
the key never goes on a command line that `ps` shows), --totals-dir (CHEFIA_LOAD_TOTALS_DIR).

Locust runs users as gevent greenlets, so the WebSocket client is websocket-client (blocking
sockets that gevent's monkey patching makes cooperative), not an asyncio library.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import gevent
import locust.runners
import msgpack
import websocket
from locust import User, events, task
from locust.env import Environment
from locust.runners import MasterRunner
from websocket import ABNF

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
# Worker processes send their statistics every 3 s by default, and at the end Locust's master
# waits only half a second for the last report before it prints: every 0.5 s, a run's summary
# misses at most about that much of its end (--totals-dir has the exact counts).
locust.runners.WORKER_REPORT_INTERVAL = 0.5
LAG_INTERVAL = 0.25  # seconds between the generator's lag samples
RECONNECT_PAUSE = 1.0  # seconds before the first new attempt, doubled up to 8
# This process's counts of operations, for --totals-dir (one process = one set of terminals).
_totals: collections.Counter[str] = collections.Counter()


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
    parser.add_argument(
        "--totals-dir",
        default="",
        env_var="CHEFIA_LOAD_TOTALS_DIR",
        help="write each process's operation counts to DIR/totals-PID.json at the end",
    )


def _generator_lag() -> None:
    """Report how late this process's event loop wakes a sleeper (type "lag", "generator")."""
    while True:
        started = time.perf_counter()
        gevent.sleep(LAG_INTERVAL)
        late = time.perf_counter() - started - LAG_INTERVAL
        events.request.fire(
            request_type="lag",
            name="generator",
            response_time=max(0.0, late) * 1000,
            response_length=0,
            exception=None,
            context={},
        )


_lag_monitor: list[gevent.Greenlet] = []


@events.test_start.add_listener
def _start_lag_monitor(environment: Environment, **_: Any) -> None:
    if not isinstance(environment.runner, MasterRunner) and not _lag_monitor:
        _lag_monitor.append(gevent.spawn(_generator_lag))


@events.test_stop.add_listener
def _write_totals(environment: Environment, **_: Any) -> None:
    """This process's counts, once its terminals have stopped (--totals-dir)."""
    while _lag_monitor:
        _lag_monitor.pop().kill(block=False)
    options = environment.parsed_options
    directory = options.totals_dir if options else ""
    if directory and _totals:
        path = os.path.join(directory, f"totals-{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump(dict(_totals), f)


_run_prefix = f"load-{uuid.uuid4().hex[:6]}"


class AckTimeout(Exception):
    """A data_sync was not answered within --ack-timeout."""


class ServerRefused(Exception):
    """The server answered sync_error or sync_conflict."""


class ServerClosed(Exception):
    """The server closed the connection (its close code and reason)."""


def _close_reason(data: bytes) -> str:
    """A close frame's payload as 'code reason'."""
    if len(data) < 2:
        return "no code"
    return f"{int.from_bytes(data[:2], 'big')} {data[2:].decode('utf-8', 'replace')}".strip()


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
        self.failed_connects = 0
        self.retry_at = 0.0
        self.timed_out: set[str] = set()  # op ids counted as AckTimeout, for late answers

    def wait_time(self) -> float:
        """Open loop at --op-rate: one operation every 1/rate seconds (sending takes ~0)."""
        return 1.0 / self.op_rate if self.op_rate > 0 else 3600.0

    # ---- connection ------------------------------------------------------------------------

    def on_start(self) -> None:
        self._connect()

    def _connect(self) -> None:
        """One attempt, reported as "connect". After a failure the next operation's turn tries
        again, after a pause that doubles (a POS terminal reconnects; it never gives up)."""
        host = (self.host or "ws://127.0.0.1:8001").rstrip("/")
        host = host.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        if not host.startswith(("ws://", "wss://")):
            host = f"ws://{host}"
        query = {"type": "pos", "encoding": "msgpack", "store_id": self.store_id}
        url = f"{host}/ws/{self.terminal_id}?{urlencode(query)}"
        headers = [f"Authorization: Bearer {self.token}"] if self.token else []
        started = time.perf_counter()
        ws = None
        try:
            ws = websocket.create_connection(url, header=headers, timeout=self.connect_timeout)
            opcode, first = ws.recv_data()
            if opcode == ABNF.OPCODE_CLOSE:
                raise ServerClosed(f"closed before connection_established: {_close_reason(first)}")
            hello = self._messages(first)
            if hello[0].get("type") != "connection_established":
                raise ServerRefused(f"expected connection_established, got {hello[:1]}")
        except Exception as exc:
            self._report("connect", started, 0, exc)
            if ws is not None:
                ws.shutdown()
            self.failed_connects += 1
            pause = RECONNECT_PAUSE * 2 ** min(3, self.failed_connects - 1)
            self.retry_at = time.perf_counter() + pause
            return
        self._report("connect", started, 0, None)
        self.failed_connects = 0
        # Reads block in the reader greenlet (no timeout: a timeout in the middle of a frame
        # would lose its start); sends and the --ack-timeout check happen in the task greenlet.
        ws.settimeout(None)
        self.ws = ws
        self.stopping = False
        self.reader = gevent.spawn(self._read_loop, ws)

    def on_stop(self) -> None:
        self.stopping = True
        if self.reader is not None:
            self.reader.kill(block=False)
        if self.ws is not None:
            # A close frame without waiting for the server's (websocket-client's close() waits
            # up to its timeout): Locust's master waits only half a second for the workers'
            # last statistics once the run time is over.
            with contextlib.suppress(Exception):
                self.ws.send_close()
            self.ws.shutdown()
            self.ws = None
        _totals["unanswered_at_stop"] += len(self.pending)
        self.pending.clear()

    def _lost(self, ws: websocket.WebSocket, why: BaseException) -> None:
        """The connection `ws` failed: report it, fail what it left unanswered, connect anew at
        the next operation."""
        if self.ws is not ws or self.stopping:
            return
        self.ws = None
        ws.shutdown()
        now = time.perf_counter()
        self._report("connection", now, 0, why, now)
        lost = ServerClosed(f"connection lost before the answer: {why}")
        for sent, size in self.pending.values():
            self._report("ack", sent, size, lost)
            _totals["lost_with_connection"] += 1
        self.pending.clear()
        self.retry_at = now + RECONNECT_PAUSE

    # ---- sending ---------------------------------------------------------------------------

    @task
    def update_table(self) -> None:
        """One UPDATE of one of this terminal's own tables, version = the last known + 1."""
        if self.ws is None:
            if time.perf_counter() >= self.retry_at:
                self._connect()
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
        _totals["sent"] += 1
        try:
            self.ws.send_binary(frame)
        except Exception as exc:
            self._lost(self.ws, exc)

    # ---- receiving -------------------------------------------------------------------------

    def _read_loop(self, ws: websocket.WebSocket) -> None:
        while True:
            try:
                opcode, frame = ws.recv_data()
            except Exception as exc:
                # Closed under us by the server is a failure; by on_stop it is the end of the run.
                self._lost(ws, exc)
                return
            if opcode == ABNF.OPCODE_CLOSE:
                self._lost(ws, ServerClosed(f"closed by the server: {_close_reason(frame)}"))
                return
            if opcode not in (ABNF.OPCODE_TEXT, ABNF.OPCODE_BINARY):
                continue
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
                if op_id in self.timed_out:
                    self.timed_out.discard(op_id)
                    _totals["confirmed_after_timeout"] += 1
                return
            if message.get("status") != "applied" and message.get("version") is not None:
                # Our count was off (a resolved conflict): take the server's version.
                self.versions[str(message.get("entity_id"))] = int(message["version"])
            _totals["confirmed"] += 1
            self._report("ack", sent[0], size, None, now)
        elif kind in ("sync_error", "sync_conflict"):
            op_id = message.get("operation_id", "")
            sent = self.pending.pop(op_id, None)
            started = sent[0] if sent is not None else now
            reason = message.get("error") or message.get("reason") or kind
            if sent is not None:
                _totals[f"{kind} {message.get('code')}: {reason}"] += 1
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
            _totals["timed_out"] += 1
            self.timed_out.add(op_id)
            self._report("ack", sent, size, AckTimeout(f"no answer within {self.ack_timeout}s"))

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
