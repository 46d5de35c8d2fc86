"""The backends the settings name: which store and which bus a process talks to."""

from __future__ import annotations

from chefia_rt.bus.base import Bus
from chefia_rt.bus.memory import MemoryBus
from chefia_rt.config import Settings
from chefia_rt.store.base import Store
from chefia_rt.sync.policies import DEFAULT_POLICY_TABLE


def make_store(settings: Settings) -> Store:
    """The storage backend DATABASE_URL names."""
    if settings.storage_kind == "sqlite":
        from chefia_rt.store.sqlite import SQLiteStore

        return SQLiteStore(settings.sqlite_path)
    from chefia_rt.store.postgres import PostgresStore

    return PostgresStore(
        settings.database_url,
        max_size=settings.database_pool_size,
        command_timeout=settings.sync_commit_timeout,
    )


def make_bus(settings: Settings) -> Bus:
    """The bus REDIS_URL names (in process without it)."""
    if settings.redis_url is None:
        return MemoryBus(lock_max=settings.locks_per_terminal)
    from chefia_rt.bus.redis import RedisBus

    return RedisBus(
        settings.redis_url, prefix=settings.redis_prefix, lock_max=settings.locks_per_terminal
    )


def known_entity_types(settings: Settings) -> set[str]:
    """The entity types metrics name (any other counts as "other", so labels stay bounded)."""
    return set(DEFAULT_POLICY_TABLE) | set(settings.sync_policies)
