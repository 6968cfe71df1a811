"""The embedding server flapping during a model upgrade's backfill.

A collection served by one OpenAI-compatible model (the SciFact MiniLM vectors, from
`fault_server`) is upgraded with `Platform.upgrade` to a second model (a fixed rotation of
that space) whose server sits behind a TCP proxy of the test's own (`faultkit.TcpProxy`).
While the new model's vectors are made, the server goes down and comes back again and
again (`faultkit.Flapper`): every two answered requests it is down for 0.6 s, four times, alternately
answering 503 to everything and vanishing (connections reset mid-request, then refused).

The Platform here is bound to the test's resources, so `upgrade` runs the backfill's jobs in
this process (`embed_and_index_job` of the new (collection, model) partition: embeddings ->
vector_table -> hnsw_index with their checks and the quality gate, then the gated swap),
the same assets `vector-platform models upgrade --wait` hands to a Dagster asset backfill
(that path, with its daemon and `models retry`, is test_upgrade_backfill's). The backfill
completes through the product's own retries (the API embedder's backoff and circuit
breaker); no `retry_upgrade` or dead-letter replay is needed, and none is made.

Asserted: the run succeeds with `no_chunk_lost` and `embeddings_are_valid` passing, no dead
letter, the swap happened, the flaps landed while the backfill ran (both kinds, and the
embedder counted the failures it retried), and the new model's table holds exactly the
expected rows: one per chunk, each with the vector the new model answers for its text.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import psycopg
import pytest
from psycopg import sql
from pgvector.psycopg import register_vector

from vector_platform import catalog

from .. import upgrade_data as data
from ..conftest import write_jsonl
from .faultkit import Figures, Flapper, TcpProxy


@pytest.fixture
def servers():
    mini, rotated = data.server(), data.server(space=data.rotation(seed=5))
    proxy = TcpProxy(("127.0.0.1", rotated.port))
    yield mini, rotated, proxy
    proxy.close()
    mini.stop()
    rotated.stop()


def _rows(dsn: str, name: str, model_key: str) -> dict:
    """chunk_id -> (text, vector) of a model's table."""
    with psycopg.connect(dsn) as conn:
        register_vector(conn)
        table = catalog.vector_table_name(conn, name, model_key)
        return {r[0]: (r[1], r[2].to_numpy()) for r in conn.execute(
            sql.SQL("SELECT chunk_id, text, embedding FROM {}").format(sql.Identifier("vp_vectors", table)))}


def test_embedding_server_flapping_during_an_upgrade_backfill(make_platform, servers, pg_dsn, tmp_path):
    figures = Figures("embedding_server_flapping_during_upgrade")
    mini, rotated, proxy = servers
    vp = make_platform()
    suffix = uuid.uuid4().hex[:6]
    old_key, new_key = f"flapold_{suffix}", f"flapnew_{suffix}"
    vp.add_model(data.spec(old_key, mini))
    # The new model's server as clients see it: through the proxy. A user's settings for a
    # flaky endpoint: small requests, quick first retries, a breaker that probes again soon.
    vp.add_model(data.spec(new_key, rotated, base_url=f"{proxy.url}/v1", max_inputs_per_request=16,
                           breaker_max_cooldown_s=2.0, give_up_after_s=120.0))
    name = f"flap_{suffix}"
    docs = data.docs_with_judged(240)
    vp.add_collection(name, write_jsonl(tmp_path / "docs.jsonl", docs), model=old_key)
    runs = vp.ingest(name)
    assert all(r.success for r in runs), [r.error for r in runs]
    with psycopg.connect(pg_dsn) as conn:
        chunk_ids = {r[0] for r in conn.execute("SELECT chunk_id FROM vector_platform.chunks WHERE collection = %s", (name,))}

    rotated.counters.reset()
    began = time.monotonic()
    with Flapper(rotated, proxy, every_ok=2, down_s=0.6, flaps=4) as flapper:
        outcome = vp.upgrade([name], new_key, say=lambda message: None)
        upgrade_seconds = time.monotonic() - began
    [run] = outcome.runs
    embed = run.metadata.get("embeddings", {})
    figures.update(
        chunks=len(chunk_ids), upgrade_seconds=round(upgrade_seconds, 2), run_success=run.success, error=run.error,
        checks=run.checks, flaps=flapper.flaps, server_requests=rotated.counters.requests,
        server_ok_requests=rotated.counters.ok_requests, server_503_answers=rotated.counters.faults["down"],
        proxy_kills=proxy.kills, swapped=name in outcome.swaps, refused=outcome.refused,
        embedder={k: embed.get(f"api_{k}") for k in ("requests", "successful_requests", "retries", "server_errors",
                                                      "connection_errors", "breaker_opens", "rejected")},
        recovered_by="the product's own retries (API embedder backoff and circuit breaker); no retry_upgrade",
    )
    assert run.success, run.error
    assert run.checks["no_chunk_lost"] is True and run.checks["embeddings_are_valid"] is True
    assert run.checks["shadow_passes_quality_gate"] is True and outcome.refused == {} and name in outcome.swaps

    # The flaps landed while the backfill ran: both kinds, and every one was noticed.
    during = [f for f in flapper.flaps if f["at_s"] < upgrade_seconds]
    assert len(during) == 4 and [f["mode"] for f in during] == ["503", "refused"] * 2, flapper.flaps
    assert rotated.counters.faults["down"] > 0 and proxy.kills >= 2
    assert embed["api_server_errors"] > 0 and embed["api_connection_errors"] > 0 and embed["api_retries"] > 0, embed
    assert embed["api_rejected"] == 0 and embed["dead_lettered"] == 0

    with psycopg.connect(pg_dsn) as conn:
        letters = conn.execute(
            "SELECT count(*) FROM vector_platform.dead_letters WHERE collection = %s AND resolved_at IS NULL", (name,)).fetchone()[0]
        serving = catalog.get_collection(conn, name).serving_model
    new_rows = _rows(pg_dsn, name, new_key)
    wrong = [cid for cid, (text, vec) in new_rows.items() if not np.allclose(vec, rotated.vector(text), atol=1e-6)]
    figures.update(new_model_rows=len(new_rows), rows_with_a_wrong_vector=len(wrong), open_dead_letters=letters,
                   serving_model_after=serving)
    # Exactly the expected rows: every chunk once, nothing else, each with the new model's vector for its text.
    assert set(new_rows) == chunk_ids and wrong == [] and letters == 0
    assert serving == new_key
    hits = vp.search(list(data.queries().values())[0], [name], k=5).hits
    assert hits and {h.model for h in hits} == {new_key}
    figures.save()
