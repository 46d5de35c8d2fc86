"""What a connection's frames become: each frame decoded into its messages, each message charged
against the terminal's rate and handed to the worker, and every ChefiaError raised on the way
answered as an `error` / `sync_error` frame (docs/protocol.md §10) or, for sustained abuse, a
close. This is the per-operation path: the Gateway's connection loop calls `serve_frame` for
every frame, so nothing here may add an await or an allocation per message lightly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from chefia_rt.config import Settings
from chefia_rt.domain import Operation, Resolution
from chefia_rt.errors import ChefiaError, Code, InvalidMessage, MessageTooBig, RateLimited
from chefia_rt.hub import Session
from chefia_rt.logs import MessageLog, operation_bound
from chefia_rt.protocol import messages as m
from chefia_rt.protocol.codec import decode_frame
from chefia_rt.sync.ratelimit import RateLimiter, Verdict
from chefia_rt.token_expiry import TokenExpiry
from chefia_rt.worker import Worker

log = logging.getLogger("chefia_rt.server")


class Dispatcher:
    """One worker's handling of incoming frames, for every connection of its Gateway."""

    def __init__(
        self,
        settings: Settings,
        worker: Worker,
        tokens: TokenExpiry,
        messages: MessageLog | None,
    ) -> None:
        self.settings = settings
        self.worker = worker
        self._tokens = tokens
        self._messages = messages
        # Buckets outlive connections, so a reconnect does not refill them (sync/ratelimit.py).
        self._rate = RateLimiter(
            settings.ws_rate_limit,
            settings.ws_rate_burst,
            settings.ws_rate_limit_strikes,
            settings.ws_rate_limit_window,
            max_terminals=max(1024, 4 * settings.max_ws_connections),
        )
        # Sessions found abusive (4005), closed once what they sent before is answered.
        self.abusers: set[Session] = set()

    async def serve_frame(self, session: Session, frame: str | bytes, invalid: list[float]) -> None:
        """Answer one frame's messages; what must end the connection closes the session, or
        leaves it in `abusers`. `invalid`: the times of the connection's recent invalid frames.
        (The loop that waits for frames is Gateway.serve: an idle connection holds one
        coroutine.)"""
        limit = self.settings.ws_invalid_frame_limit
        window = self.settings.ws_invalid_frame_window
        received = time.monotonic()
        session.last_seen = received
        session.bytes_in += len(frame)
        try:
            raws = decode_frame(frame, self.settings.max_ws_message_size)
        except MessageTooBig as exc:
            session.close(Code.MESSAGE_TOO_BIG, exc.reason)
            return
        except InvalidMessage as exc:
            raws = []
            session.send(m.error_msg(exc.code, exc.reason))
            if self._abusive(invalid, received, limit, window):
                session.close(Code.INVALID_MESSAGE, "too many invalid messages")
                return
        self.worker.stats.message(len(raws) or 1)
        for raw in raws:
            session.messages_in += 1
            try:
                with operation_bound(_operation_id(raw)):
                    if self._messages is not None:
                        self._messages.incoming(raw)
                    await self._dispatch(session, raw, received)
            except ChefiaError as exc:
                session.send(self._error_frame(raw, exc))
                if exc.code == Code.INVALID_MESSAGE and self._abusive(
                    invalid, received, limit, window
                ):
                    session.close(Code.INVALID_MESSAGE, "too many invalid messages")
                    return
                if session.closed or session in self.abusers:  # sustained rate-limit abuse
                    return
            except Exception:
                # A bug must cost one answer, not the terminal's connection.
                log.exception("handling %r from %s failed", raw.get("type"), session.terminal_id)
                internal = ChefiaError("internal server error; retry", Code.INTERNAL_ERROR)
                session.send(self._error_frame(raw, internal))

    async def close_abusive(self, session: Session) -> None:
        """Close 4005 for sustained abuse, once the operations the terminal sent before are
        answered (bounded by the commit timeout). Closing drops what is queued for the
        terminal: a burst that the bucket let in and the writer had not committed yet would
        lose its answers, and a client that sends its unanswered operations again when it
        reconnects would meet the same close, again before any answer, forever."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.sync_commit_timeout):
                await self.worker.pipeline.answered_so_far()
        # The answers' flush was scheduled before this task woke up: it has run.
        session.close(Code.RATE_LIMITED, "rate limit exceeded repeatedly")

    @staticmethod
    def _abusive(invalid: list[float], now: float, limit: int, window: float) -> bool:
        invalid.append(now)
        recent = [t for t in invalid if t >= now - window]
        invalid[:] = recent[-limit:]
        return len(recent) >= limit

    @staticmethod
    def _error_frame(raw: dict[str, Any], exc: ChefiaError) -> dict[str, Any]:
        """sync_error for anything about an operation, plain error otherwise."""
        kind = raw.get("type")
        op = raw.get("operation") if kind == "data_sync" else None
        if isinstance(op, dict):
            op_id, et, eid = op.get("id"), op.get("entity_type"), op.get("entity_id")
            return m.sync_error_msg(
                op_id if isinstance(op_id, str) else None,
                exc.code,
                exc.reason,
                et if isinstance(et, str) else None,
                eid if isinstance(eid, str) else None,
            )
        if kind == "conflict_resolution":
            cid = raw.get("conflict_id")
            return m.sync_error_msg(cid if isinstance(cid, str) else None, exc.code, exc.reason)
        return m.error_msg(exc.code, exc.reason)

    async def _dispatch(self, session: Session, raw: dict[str, Any], received: float) -> None:
        msg = m.parse_incoming(raw)
        worker = self.worker
        if isinstance(msg, m.DataSyncIn):
            op = self._operation(session, msg.operation)
            bulk = op.operation == m.OpKind.BULK_UPDATE
            self._charge(session, len(op.data["updates"]) if bulk else 1, received)
            await worker.check_operation(session, op)
            worker.pipeline.submit(op, session, received)
        elif isinstance(msg, m.PingIn):
            session.send(m.pong_msg(msg.timestamp))
        elif isinstance(msg, m.SyncConfirmationIn):
            session.acked_seq = max(session.acked_seq, msg.seq or 0)
        elif isinstance(msg, m.ConflictResolutionIn):
            self._charge(session, 1, received)
            worker.permissions.check_resolve(session.terminal_type)
            resolution = Resolution(
                conflict_id=msg.conflict_id,
                store_id=session.store_id,
                terminal_id=session.terminal_id,
                user_id=session.user_id,
                resolution=msg.resolution.value,
                resolved_data=msg.resolved_data,
                timestamp=m.client_time(msg.timestamp, self.settings.clock_skew_max),
            )
            worker.pipeline.submit(resolution, session, received)
        elif isinstance(msg, m.AcquireLockIn):
            self._charge(session, self.settings.ws_rate_cost_lock, received, "an acquire_lock")
            answer = await worker.acquire_lock(
                session, msg.entity_type, msg.entity_id, msg.timeout, msg.lock_id
            )
            session.send(answer)
            await worker.monitor.lock(session, answer)
        elif isinstance(msg, m.ReleaseLockIn):
            self._charge(session, self.settings.ws_rate_cost_lock, received, "a release_lock")
            answer = await worker.release_lock(session, msg.entity_type, msg.entity_id, msg.lock_id)
            session.send(answer)
            await worker.monitor.lock(session, answer)
        elif isinstance(msg, m.ResumeIn):
            self._charge(session, self.settings.ws_rate_cost_resume, received, "a resume")
            await worker.sessions.resume(session, msg.since, msg.epoch)
        elif isinstance(msg, m.SnapshotRequestIn):
            self._charge(
                session, self.settings.ws_rate_cost_snapshot, received, "a snapshot_request"
            )
            await worker.sessions.snapshot(session, msg.entity_types)
        elif isinstance(msg, m.RefreshTokenIn):
            self._charge(session, 1, received)  # each costs a signature check
            session.send(self._tokens.refresh(session, msg.token))
        elif isinstance(msg, m.PerformanceMetricsIn):
            session.metrics = msg.model_dump(exclude={"type"})
            await worker.monitor.terminal_metrics(session, session.metrics)

    def _charge(self, session: Session, cost: float, now: float, what: str = "") -> None:
        """Count a request against the terminal's rate (`cost` operations; `what` names a
        request that is not one): 4005 over it, close 4005 when sustained."""
        if cost <= 0:
            return
        verdict = self._rate.check((session.store_id, session.terminal_id), cost, now)
        if verdict is Verdict.ALLOW:
            return
        self.worker.metrics.rate_limited.inc()
        if verdict is Verdict.ABUSIVE:
            self.abusers.add(session)  # the connection's loop closes it: close_abusive
        costs = f"; {what} costs {cost:g}" if what else ""
        raise RateLimited(
            f"rate limit: at most {self.settings.ws_rate_limit:g} operations/s "
            f"(burst {self.settings.ws_rate_burst:g}{costs}); retry later"
        )

    def _operation(self, session: Session, model: m.OperationModel) -> Operation:
        """The Operation a terminal sent. With JWT on, `user_id` is the token's (the identity
        the audit records); a different user_id in the message is kept as a claim only."""
        data = model.data
        if model.operation == m.OpKind.BULK_UPDATE:
            data = {"updates": [item.model_dump() for item in model.bulk_items()]}
        if self.settings.auth_enabled:
            user_id = session.user_id
        else:
            user_id = model.user_id or session.user_id
        claimed = model.user_id if model.user_id != user_id else None
        return Operation(
            id=model.id,
            store_id=session.store_id,
            entity_type=model.entity_type,
            entity_id=model.entity_id,
            operation=model.operation.value,
            data=data,
            version=model.version,
            timestamp=m.client_time(model.timestamp, self.settings.clock_skew_max),
            terminal_id=session.terminal_id,
            user_id=user_id,
            requires_lock=model.requires_lock,
            priority=model.priority.value,
            claimed_user_id=claimed,
            existing_only=self.worker.permissions.existing_only(
                session.terminal_type, model.entity_type
            ),
        )


def _operation_id(raw: dict[str, Any]) -> str | None:
    """The operation a message is about, for the log context."""
    op = raw.get("operation")
    if isinstance(op, dict) and isinstance(op.get("id"), str):
        return str(op["id"])[:128]
    conflict_id = raw.get("conflict_id")
    return conflict_id[:128] if isinstance(conflict_id, str) else None
