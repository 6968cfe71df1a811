"""The OpenAI-compatible embedder against a fault-injecting server over real HTTP."""

import time

import numpy as np
import pytest

from vector_platform.ingest.api_embedder import ApiEmbedder, ApiLimits, FatalApiError, InputRejected, pack
from vector_platform.models import ModelSpec

from .fault_server import FaultServer

SPEC = ModelSpec("api_minilm", "openai", "all-minilm-l6-v2", 384, max_tokens=8191)


@pytest.fixture
def server(scifact_texts):
    server = FaultServer(known=scifact_texts[1]).start()
    yield server
    server.stop()


def _embedder(server, **limits):
    defaults = dict(max_inputs_per_request=100, max_in_flight=4, timeout_s=2.0, backoff_base_s=0.05, backoff_max_s=0.5,
                    breaker_cooldown_s=0.5, give_up_after_s=120)
    defaults.update(limits)
    return ApiEmbedder(SPEC, api_key="test", base_url=server.base_url, limits=ApiLimits(**defaults))


def test_packing_respects_input_and_token_limits():
    batches = pack([10, 10, 10, 50, 5, 5, 5], max_inputs=3, max_tokens=40)
    assert batches == [[0, 1, 2], [3], [4, 5, 6]]
    assert pack([], 3, 40) == []


def test_every_input_gets_exactly_one_vector_under_429_5xx_and_timeouts(server, scifact_texts):
    texts, known = scifact_texts
    clean = _embedder(server, max_inputs_per_request=25).embed(texts)
    fault_free_requests = server.counters.requests
    assert all(np.allclose(v, known[t]) for v, t in zip(clean, texts))

    server.counters.reset()
    server.faults.rate_429, server.faults.rate_5xx, server.faults.rate_timeout = 0.30, 0.05, 0.02
    embedder = _embedder(server, max_inputs_per_request=25)
    vectors = embedder.embed(texts)
    assert not [v for v in vectors if isinstance(v, InputRejected)]
    assert all(np.allclose(v, known[t]) for v, t in zip(vectors, texts))
    assert set(server.counters.texts.values()) == {1}  # each input answered once: nothing re-sent after success
    assert len(server.counters.texts) == len(texts)
    stats = embedder.stats
    faults = server.counters.faults
    assert faults["429"] > 0
    # Every fault the server injected was seen, classified and retried by the client (on a busy
    # machine a slow healthy answer can time out too, so timeouts are at least those injected).
    assert (stats.throttled_429, stats.server_errors) == (faults["429"], faults["5xx"])
    assert stats.timeouts >= faults["timeout"]
    assert stats.retries == stats.requests - stats.successful_requests
    # Retried inputs stay batched: the successful requests are exactly the fault-free ones.
    assert stats.successful_requests == fault_free_requests == 80
    # With a fault on 37 % of requests, no client can send fewer than 1 / (1 - 0.37) = 1.59x the
    # fault-free requests; batched retries stay close to that (per-input retries would be ~40x).
    failed = (server.counters.requests - stats.successful_requests) / server.counters.requests
    assert server.counters.requests <= 1.25 * fault_free_requests / (1 - failed)
    print(f"fault-free {fault_free_requests} requests; under faults {server.counters.requests} "
          f"({server.counters.requests / fault_free_requests:.2f}x, failed fraction {failed:.2f}), {stats.as_dict()}")


def test_one_poison_input_is_isolated_by_splitting(server, scifact_texts):
    texts = list(scifact_texts[0][:1000])
    texts[637] = "POISON " + texts[637]
    server.faults.poison_marker = "POISON"
    embedder = _embedder(server, max_inputs_per_request=256)
    vectors = embedder.embed(texts)
    rejected = [i for i, v in enumerate(vectors) if isinstance(v, InputRejected)]
    assert rejected == [637]
    assert "forbidden token" in vectors[637].reason and "400" in vectors[637].reason
    assert sum(isinstance(v, np.ndarray) for v in vectors) == 999
    assert embedder.stats.splits <= 2 * 8  # a binary search, not one request per input


def test_malformed_responses_are_retried_and_a_bad_vector_is_never_accepted(server, scifact_texts):
    texts = scifact_texts[0][:600]
    server.faults.rate_truncated, server.faults.rate_drop = 0.1, 0.1
    server.faults.rate_wrong_dims, server.faults.rate_nan = 0.1, 0.1
    embedder = _embedder(server, max_inputs_per_request=20)
    vectors = embedder.embed(texts)
    assert all(isinstance(v, np.ndarray) and v.shape == (384,) and np.isfinite(v).all() for v in vectors)
    faults = server.counters.faults
    assert faults["truncated"] + faults["wrong_dims"] + faults["nan"] > 0 and faults["drop"] > 0
    assert embedder.stats.bad_responses == faults["truncated"] + faults["wrong_dims"] + faults["nan"]
    assert embedder.stats.connection_errors + embedder.stats.timeouts >= faults["drop"]
    # 30 batches; three malformed answers in a row split a batch (one more request) to find the input.
    assert 30 <= embedder.stats.successful_requests <= 30 + embedder.stats.splits


def test_server_down_for_a_while_opens_the_breaker_and_the_run_completes(server, scifact_texts):
    texts = scifact_texts[0][:400]
    server.faults.down_until = time.monotonic() + 20
    embedder = _embedder(server, breaker_max_cooldown_s=4.0)
    started = time.monotonic()
    vectors = embedder.embed(texts)
    assert all(isinstance(v, np.ndarray) for v in vectors)
    assert 20 <= time.monotonic() - started < 40
    assert embedder.stats.breaker_opens >= 1
    # While open the breaker holds requests back: a handful of probes, not a storm.
    assert server.counters.faults["down"] < 30


def test_an_api_that_stays_down_is_given_up_on_and_later_calls_fail_fast(server, scifact_texts):
    server.faults.down_until = time.monotonic() + 3600
    embedder = _embedder(server, give_up_after_s=2.0, breaker_max_cooldown_s=0.5)
    first = embedder.embed(scifact_texts[0][:50])
    assert all(isinstance(v, InputRejected) and "gave up" in v.reason and "503" in v.reason for v in first)
    requests = server.counters.requests
    started = time.monotonic()
    second = embedder.embed(scifact_texts[0][50:100])
    assert time.monotonic() - started < 2.0 and server.counters.requests == requests
    assert all("API unavailable, not tried" in v.reason for v in second)


def test_shared_budget_paces_requests_per_minute_and_tokens_per_minute():
    import asyncio

    from vector_platform.ingest.api_embedder import ApiStats, _Budget

    async def run(budget, n, tokens):
        started = time.monotonic()
        for _ in range(n):
            await budget.acquire(tokens)
        return time.monotonic() - started

    stats = ApiStats()
    # 60/minute: a full minute's burst goes at once, then one request a second.
    assert asyncio.run(run(_Budget(60, None, stats), 60, 1)) < 0.5
    assert 1.8 <= asyncio.run(run(_Budget(60, None, stats), 62, 1)) < 5.0
    # 6,000 tokens/minute = 100 a second: 43 x 150 tokens is 450 over the burst, ~4.5 s.
    token_stats = ApiStats()
    assert 4.0 <= asyncio.run(run(_Budget(None, 6000, token_stats), 43, 150)) < 9.0
    assert stats.seconds_throttled > 1.5 and token_stats.seconds_throttled > 4.0


def test_per_input_token_limit_and_fatal_auth_errors(server):
    embedder = _embedder(server, max_tokens_per_input=50)
    out = embedder.embed(["short text", "word " * 200, "   "])
    assert isinstance(out[0], np.ndarray)
    assert "over the limit of 50" in out[1].reason and out[2].reason == "empty input"
    bad = ApiEmbedder(SPEC, api_key="test", base_url=server.base_url.replace("/v1", "/nowhere"), limits=ApiLimits(timeout_s=2))
    with pytest.raises(FatalApiError, match="404"):
        bad.embed(["hello"])


def test_the_rate_budget_carries_over_from_one_embed_call_to_the_next(server, scifact_texts):
    texts, _ = scifact_texts
    embedder = _embedder(server, max_inputs_per_request=1, requests_per_minute=60)
    embedder.embed(texts[:58])  # 58 of the minute's 60 requests
    assert embedder.stats.seconds_throttled < 0.5
    started = time.perf_counter()
    embedder.embed(texts[58:62])  # a new call must not start with a full bucket
    assert time.perf_counter() - started >= 0.8 and embedder.stats.seconds_throttled >= 0.8
