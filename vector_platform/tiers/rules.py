"""Which tier moves a collection's rules ask for now. Pure: states and "now" in, decisions out.

- `evict_after_days` N: an active collection not queried for N days (counted from its last
  query, or from when it became active, or was created) is evicted.
- `archive_after_days` N: a collection cold for N days is archived.
- `rehydrate_on_query`: a query to a cold collection leaves a request; it is rehydrated.
  A pending request wins over archiving.

Each decision has a run key naming the state it was taken in, so the sensor launches one run
per state however often it ticks; a new query, or a move, makes a new state.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from vector_platform.catalog.tiers import TierState


@dataclass(frozen=True)
class Decision:
    collection: str
    target: str  # the tier to move to
    rule: str  # evict_after_days | archive_after_days | rehydrate_on_query
    run_key: str
    why: str


def _stamp(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def due_moves(states: list[TierState], now: dt.datetime) -> list[Decision]:
    decisions = []
    for s in states:
        rules = s.rules
        if s.tier == "active" and rules.evict_after_days:
            idle_since = max(t for t in (s.last_queried_at, s.tier_changed_at, s.created_at) if t is not None)
            idle = now - idle_since
            if idle >= dt.timedelta(days=rules.evict_after_days):
                decisions.append(
                    Decision(
                        s.name, "cold", "evict_after_days", f"evict:{s.name}:{_stamp(idle_since)}",
                        f"not queried for {idle.total_seconds() / 86400:.1f} days (rule: {rules.evict_after_days})",
                    )
                )
        elif s.tier == "cold":
            cold_since = s.tier_changed_at or s.created_at
            if rules.rehydrate_on_query and s.rehydrate_requested_at is not None:
                decisions.append(
                    Decision(
                        s.name, "active", "rehydrate_on_query", f"rehydrate:{s.name}:{_stamp(cold_since)}",
                        f"queried while cold at {s.rehydrate_requested_at.isoformat()}",
                    )
                )
            elif rules.archive_after_days and now - cold_since >= dt.timedelta(days=rules.archive_after_days):
                decisions.append(
                    Decision(
                        s.name, "archived", "archive_after_days", f"archive:{s.name}:{_stamp(cold_since)}",
                        f"cold for {(now - cold_since).total_seconds() / 86400:.1f} days (rule: {rules.archive_after_days})",
                    )
                )
    return decisions
