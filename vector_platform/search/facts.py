"""What search needs to know about a collection, cached per process and kept fresh by the
catalog itself.

Every change of a cached fact (tier, settings, serving model, rules, attachments, models,
a serving view replaced) is announced by the catalog on the `vector_platform_catalog`
channel (triggers from migration 0003, and `tables.publish_view`). One listener thread per
database drops the named collection's entry when it hears one. While the listener is not
connected nothing is cached, so a lost connection costs speed, never freshness. A search
that still meets a dropped table in the short window before the notice arrives re-reads the
facts and retries (see `vector_platform.search`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from vector_platform import catalog
from vector_platform.catalog import tiers as tier_sql
from vector_platform.catalog.collections import CHANGES_CHANNEL
from vector_platform.catalog.tiers import SnapshotReceipt, TierRules
from vector_platform.models import ModelSpec
from vector_platform.settings import CollectionSettings

log = logging.getLogger(__name__)
# Even with the listener up, an entry is re-read after this long (a connection that died
# silently delivers no notices and raises nothing).
MAX_AGE_S = 30.0


@dataclass(frozen=True)
class Facts:
    name: str
    tier: str
    spec: ModelSpec | None  # the serving model
    fingerprint: str | None  # of the serving model's vectors
    settings: CollectionSettings
    rules: TierRules
    has_view: bool
    snapshot: SnapshotReceipt | None  # what serves the collection while it is cold


def read_facts(conn: psycopg.Connection, name: str) -> Facts | None:
    row = conn.execute(
        """
        SELECT c.tier, c.serving_model, c.settings, c.tier_rules, m.fingerprint, m.cold_snapshot_id,
               to_regclass(format('%%I.%%I', %s::text, c.name)) IS NOT NULL
        FROM vector_platform.collections c
        LEFT JOIN vector_platform.collection_models m ON m.collection = c.name AND m.model_key = c.serving_model
        WHERE c.name = %s
        """,
        (catalog.SERVING, name),
    ).fetchone()
    if row is None:
        return None
    tier, serving, settings, rules, fingerprint, snapshot_id, has_view = row
    spec = catalog.get_model(conn, serving) if serving else None
    snapshot = tier_sql.get_snapshot(conn, snapshot_id) if snapshot_id is not None else None
    return Facts(
        name, tier, spec, fingerprint, CollectionSettings.from_json(settings), TierRules.from_json(rules), has_view, snapshot
    )


class FactsCache:
    """Facts per collection name, invalidated by the catalog's notices."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self._facts: dict[str, tuple[Facts | None, float]] = {}
        self._generation = 0
        self._lock = threading.Lock()
        self._listening = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="vector_platform catalog listener", daemon=True)
        self._thread.start()
        self._listening.wait(timeout=5)

    def cached(self, name: str) -> Facts | None:
        """The collection's facts when the cache holds them fresh (no connection needed), else None."""
        with self._lock:
            cached = self._facts.get(name)
            if cached is not None and time.monotonic() - cached[1] < MAX_AGE_S:
                return cached[0]
        return None

    def get(self, conn: psycopg.Connection, name: str) -> Facts | None:
        with self._lock:
            cached = self._facts.get(name)
            if cached is not None and time.monotonic() - cached[1] < MAX_AGE_S:
                return cached[0]
            generation = self._generation
        facts = read_facts(conn, name)
        with self._lock:
            # Keep it only if no notice arrived while it was read and the listener is up.
            if generation == self._generation and self._listening.is_set():
                self._facts[name] = (facts, time.monotonic())
        return facts

    def invalidate(self, name: str | None = None) -> None:
        with self._lock:
            self._generation += 1
            if name:
                self._facts.pop(name, None)
            else:
                self._facts.clear()

    def close(self) -> None:
        self._stopped.set()

    def _listen(self) -> None:
        down_since = None  # the outage is said once, when it starts, and when it ends
        while not self._stopped.is_set():
            try:
                with psycopg.connect(
                    self.dsn, autocommit=True, application_name="vector_platform catalog listener",
                    keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3,
                ) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANGES_CHANNEL)))
                    self.invalidate()  # anything cached before this point may have missed a notice
                    self._listening.set()
                    if down_since is not None:
                        log.info("catalog listener is back after %.0f s; search caches facts again", time.monotonic() - down_since)
                        down_since = None
                    while not self._stopped.is_set():
                        for notice in conn.notifies(timeout=1.0):
                            self.invalidate(notice.payload or None)
            except Exception as err:  # noqa: BLE001 - keep serving uncached, try again
                if self._stopped.is_set():
                    return
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("catalog listener lost its connection (%s); search reads facts uncached until it is back", err)
                else:
                    log.debug("catalog listener still cannot connect: %s", err)
            finally:
                self._listening.clear()
                self.invalidate()
            time.sleep(1.0)

