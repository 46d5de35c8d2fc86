"""Prometheus metrics of one worker, and the exposition of the whole node (docs/operations.md §4).

Workers of a node are separate processes, so prometheus_client runs in multiprocess mode: every
worker writes its values to files in one directory (PROMETHEUS_MULTIPROC_DIR) that the supervisor
creates empty before the workers start, and a scrape of any worker reads all of them. When a
worker dies the supervisor marks it dead, which removes its live gauges (connections, queue
depths) from the sums; counters and histograms keep what the dead worker counted, as Prometheus
expects of a counter.

Without the directory (one worker run directly, the in-process test server) the same metric
objects live in a private registry of this Worker: nothing is module-global, so two Nodes in one
process never mix their figures.

`terminal_status{terminal_id, type, store_id}` is not a stored metric: multiprocess gauges cannot
drop a label across processes, so it is built at scrape time from the cluster-wide terminal
directory (`node.terminals`, when present), and a terminal forgotten there leaves the scrape.

Label values are bounded: entity types outside the configured policy table count as "other",
terminal types are the four of docs/protocol.md §1, statuses and reasons are fixed sets.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chefia_rt.protocol.messages import TERMINAL_TYPES

log = logging.getLogger("chefia_rt.metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "other"

# Receive → confirmation of one operation: a LAN round trip is ~1 ms, the alert is at 100 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

# Read at scrape time: the cluster-wide terminals (store_id, terminal_id, type, online) and the
# worker's RequestCache figures, each None when that part is not there.
TerminalSource = Callable[[], Iterable[tuple[str, str, str, bool]]]


def prepare_dir(path: str | Path) -> Path:
    """Create the aggregation directory, or empty it of an earlier run's files.

    Stale files would add a previous run's counters to this run's and keep dead workers'
    connections in the sums.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)
    return directory


def remove_dir(path: str | Path) -> None:
    """Delete an aggregation directory the supervisor created for itself."""
    shutil.rmtree(path, ignore_errors=True)


def mark_dead(path: str | Path, pid: int) -> None:
    """A worker exited: drop its live gauges from every later scrape."""
    prom_multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


class _TerminalCollector(Collector):
    """terminal_status{terminal_id, type, store_id}, from the terminal directory at scrape time.

    store_id is a label because every restaurant of a chain has its own "pos-1": without it, one
    store's offline pos-1 would hide behind another's online one."""

    def __init__(self, source: Callable[[], TerminalSource | None]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "terminal_status",
            "1 while a terminal is connected (anywhere in the deployment), 0 while it is "
            "offline but remembered",
            labels=["terminal_id", "type", "store_id"],
        )
        source = self._source()
        if source is not None:
            for store_id, terminal_id, terminal_type, online in source():
                family.add_metric([terminal_id, terminal_type, store_id], 1.0 if online else 0.0)
        yield family


class Metrics:
    """The metric objects of one worker, and the node-wide exposition.

    `multiproc_dir` None: single-process mode with a private registry.
    """

    def __init__(self, entity_types: Iterable[str], multiproc_dir: str | None = None) -> None:
        self.multiproc_dir = multiproc_dir
        self._entity_types = frozenset(entity_types)
        # In multiprocess mode the values live in files; a registry of the objects themselves
        # would only ever show this worker, so they are registered nowhere.
        own = None if multiproc_dir else CollectorRegistry(auto_describe=True)
        self.terminal_source: TerminalSource | None = None
        self._loop_lag_max = 0.0
        self.active_connections = Gauge(
            "websocket_active_connections",
            "Open WebSocket connections",
            registry=own,
            multiprocess_mode="livesum",
        )
        self.connections_by_type = Gauge(
            "websocket_connections",
            "Open WebSocket connections by terminal type",
            ["type"],
            registry=own,
            multiprocess_mode="livesum",
        )
        self.connections_total = Counter(
            "websocket_connections_opened",
            "WebSocket sessions opened, by terminal type",
            ["type"],
            registry=own,
        )
        self.message_duration = Histogram(
            "websocket_message_duration_seconds",
            "Time from receiving an operation to sending its answer (after the commit)",
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        self.operations = Counter(
            "sync_operations",
            "Operations answered, by entity type, operation and answer status",
            ["entity_type", "operation", "status"],
            registry=own,
        )
        self.conflicts = Counter(
            "sync_conflicts",
            "Conflicting operations, by entity type and the policy that settled them",
            ["entity_type", "policy"],
            registry=own,
        )
        self.batch_size = Histogram(
            "sync_batch_size",
            "Operations per storage transaction (group commit)",
            buckets=BATCH_BUCKETS,
            registry=own,
        )
        self.commit_duration = Histogram(
            "sync_commit_duration_seconds",
            "Time of one storage transaction, engine decisions included",
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        # Added up in the worker and written every WS_STATS_INTERVAL: a write per stage and
        # report, not per batch (a multiprocess value costs about 2.6 µs a write).
        self.batch_stages = Counter(
            "sync_batch_stage_seconds",
            "Seconds committed batches spent in each stage, from the lease check to the last "
            "answer (docs/operations.md lists the stages); added every WS_STATS_INTERVAL",
            ["stage"],
            registry=own,
        )
        self.batches_timed = Counter(
            "sync_batches_timed",
            "Committed batches counted in sync_batch_stage_seconds_total",
            registry=own,
        )
        self._stage_seconds: dict[str, float] = {}
        self._batches_timed = 0
        self.write_queue = Gauge(
            "sync_write_queue_depth",
            "Operations waiting for the next transaction",
            registry=own,
            multiprocess_mode="livesum",
        )
        self.outbound_queued = Gauge(
            "websocket_outbound_queue_messages",
            "Messages queued to be sent to terminals, summed over connections",
            registry=own,
            multiprocess_mode="livesum",
        )
        self.outbound_max = Gauge(
            "websocket_outbound_queue_max_depth",
            "The longest outbound queue of one connection",
            registry=own,
            multiprocess_mode="livemax",
        )
        self.bus_lag = Histogram(
            "bus_delivery_lag_seconds",
            "Time from an operation's commit decision (server_time) to its delivery to a "
            "worker's terminals through the bus",
            buckets=LAG_BUCKETS,
            registry=own,
        )
        self.loop_lag = Histogram(
            "event_loop_lag_seconds",
            "How late a worker's event loop ran a timer (checked every 0.1 s): a stall's length",
            buckets=LOOP_LAG_BUCKETS,
            registry=own,
        )
        self.loop_lag_max = Gauge(
            "event_loop_lag_max_seconds",
            "The worst event-loop lag of a worker since it started (the worst live worker)",
            registry=own,
            multiprocess_mode="livemax",
        )
        self.resumes = Counter(
            "websocket_resumes",
            "Stream restarts: resume with since, resync_required answers, snapshots",
            ["kind"],
            registry=own,
        )
        self.rate_limited = Counter(
            "websocket_rate_limited",
            "Operations refused by the per-terminal rate limit (4005)",
            registry=own,
        )
        self.auth_failures = Counter(
            "websocket_auth_failures",
            "Refused credentials: WebSocket handshakes (4003) and HTTP requests (401/403)",
            ["endpoint"],
            registry=own,
        )
        self.storage_up = Gauge(
            "chefia_storage_up",
            "1 when storage answered the last ping of every worker, 0 when one did not",
            registry=own,
            multiprocess_mode="livemin",
        )
        self.bus_up = Gauge(
            "chefia_bus_up",
            "1 when the bus answered the last ping of every worker",
            registry=own,
            multiprocess_mode="livemin",
        )
        self.cache_requests = Counter(
            "cache_requests",
            "RequestCache reads by entity type and result (hit, miss)",
            ["entity_type", "result"],
            registry=own,
        )
        self.cache_entries = Gauge(
            "cache_entries",
            "RequestCache entries held, by entity type",
            ["entity_type"],
            registry=own,
            # Every worker counts the same shared cache (Redis): a sum would count it W times.
            multiprocess_mode="livemax",
        )
        self._children: dict[tuple[str, ...], Any] = {}
        self._cache_seen: dict[tuple[str, str], float] = {}
        self.registry = self._scrape_registry(own)

    def _scrape_registry(self, own: CollectorRegistry | None) -> CollectorRegistry:
        if own is not None:
            own.register(_TerminalCollector(lambda: self.terminal_source))
            return own
        registry = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(registry, self.multiproc_dir)  # type: ignore[no-untyped-call]
        registry.register(_TerminalCollector(lambda: self.terminal_source))
        return registry

    def exposition(self) -> bytes:
        """The Prometheus text format of the whole node (every worker of this directory)."""
        return generate_latest(self.registry)

    # ---- hooks (hot paths keep label children cached) ---------------------------------------

    def entity_label(self, entity_type: str | None) -> str:
        """An entity type as a label value: only configured types, so the set stays bounded."""
        return entity_type if entity_type in self._entity_types else OTHER

    def _child(self, metric: Counter | Gauge, *labels: str) -> Any:
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def connected(self, terminal_type: str) -> None:
        """A session opened (registered in the hub)."""
        kind = terminal_type if terminal_type in TERMINAL_TYPES else OTHER
        self.active_connections.inc()
        self._child(self.connections_by_type, kind).inc()
        self._child(self.connections_total, kind).inc()

    def disconnected(self, terminal_type: str) -> None:
        """A session that `connected` counted has ended."""
        kind = terminal_type if terminal_type in TERMINAL_TYPES else OTHER
        self.active_connections.dec()
        self._child(self.connections_by_type, kind).dec()

    def answered(
        self,
        entity_type: str | None,
        operation: str,
        status: str,
        latency: float | None,
        policy: str | None = None,
    ) -> None:
        """One operation answered: its status, its latency, and the conflict if it was one.

        `policy` is given when the operation conflicted (resolved by that policy or waiting
        for a person); `latency` is None for answers that are no new work (duplicates, errors).
        """
        entity = self.entity_label(entity_type)
        self._child(self.operations, entity, operation, status).inc()
        if latency is not None:
            self.message_duration.observe(latency)
        if policy is not None:
            self._child(self.conflicts, entity, policy).inc()

    def committed(self, size: int, seconds: float, laps: Mapping[str, float]) -> None:
        """One storage transaction of `size` operations took `seconds`; `laps`: the batch's
        seconds by stage."""
        self.batch_size.observe(size)
        self.commit_duration.observe(seconds)
        stages = self._stage_seconds
        for stage, spent in laps.items():
            stages[stage] = stages.get(stage, 0.0) + spent
        self._batches_timed += 1

    def flush_stages(self) -> None:
        """Write the stages of the batches committed since the last call (the worker's periodic
        report calls it)."""
        for stage, spent in self._stage_seconds.items():
            self._child(self.batch_stages, stage).inc(spent)
        if self._batches_timed:
            self.batches_timed.inc(self._batches_timed)
        self._stage_seconds = {}
        self._batches_timed = 0

    def delivered(self, server_time: str) -> None:
        """A batch of pushes reached this worker; `server_time` is its last record's."""
        try:
            decided = datetime.fromisoformat(server_time).timestamp()
        except ValueError:
            return
        self.bus_lag.observe(max(0.0, time.time() - decided))

    def event_loop_lag(self, lag: float) -> None:
        """One check of the worker's event loop (stats.LoopLag)."""
        self.loop_lag.observe(lag)
        if lag > self._loop_lag_max:
            self._loop_lag_max = lag
            self.loop_lag_max.set(lag)

    def resumed(self, kind: str) -> None:
        """A stream restart: "resume" (since), "resync_required" or "snapshot"."""
        self._child(self.resumes, kind).inc()

    def refused_auth(self, endpoint: str) -> None:
        """A credential was refused: "websocket" or "http"."""
        self._child(self.auth_failures, endpoint).inc()

    def queues(self, write_queue: int, outbound: Sequence[int]) -> None:
        """Queue depths, sampled by the worker's periodic report."""
        self.write_queue.set(write_queue)
        self.outbound_queued.set(sum(outbound))
        self.outbound_max.set(max(outbound, default=0))

    def health(self, storage_ok: bool, bus_ok: bool) -> None:
        """The worker's latest pings of storage and bus."""
        self.storage_up.set(1 if storage_ok else 0)
        self.bus_up.set(1 if bus_ok else 0)

    def cache(self, stats: dict[str, Any]) -> None:
        """Feed the RequestCache's cumulative figures (`RequestCache.stats()`).

        Shape: {"hits": {type: n} | n, "misses": {type: n} | n, "entries": {type: n} | n}.
        Counters only grow, so each call adds what is new since the last one.
        """
        for result, field in (("hit", "hits"), ("miss", "misses")):
            for entity_type, total in _per_type(stats.get(field)).items():
                key = (self._cache_label(entity_type), result)
                seen = self._cache_seen.get(key, 0.0)
                if total > seen:
                    self._child(self.cache_requests, *key).inc(total - seen)
                self._cache_seen[key] = max(seen, total)
        for entity_type, count in _per_type(stats.get("entries")).items():
            self._child(self.cache_entries, self._cache_label(entity_type)).set(count)

    def _cache_label(self, entity_type: str) -> str:
        return "all" if entity_type == "all" else self.entity_label(entity_type)


def _per_type(value: object) -> dict[str, float]:
    """A figure per entity type ({type: n}) or in total (n, counted as "all")."""
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items() if isinstance(v, int | float)}
    if isinstance(value, int | float):
        return {"all": float(value)}
    return {}


def multiproc_dir_from_env() -> str | None:
    """The aggregation directory this process was started with (prometheus_client chooses its
    value class from the same variable, at import)."""
    return os.environ.get(MULTIPROC_ENV) or None
