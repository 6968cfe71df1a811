"""Embedding-API benchmark: our embedder vs the loop most tutorials show, same server, same run.

The server is the OpenAI-compatible test server (vector_platform_tests/fault_server.py) on
127.0.0.1 with a fixed per-request latency, a per-request input limit and a requests-per-
minute limit (429 + retry-after-ms once exceeded), first with no injected faults, then with
30 % of requests answered 429. The baseline is the `openai` client called one batch at a
time in a loop, retried the way the OpenAI cookbook does with tenacity
(`wait_random_exponential(min=1, max=60)`, `stop_after_attempt(6)`), written out here.

Prints chunks/s of both and their ratio per scenario, then as its last lines
`speedup_vs_naive=<the smaller of the two ratios>` and
`batch_fill_under_429=<mean inputs per request ÷ the per-request input limit the token budget allows>`.

    .venv/bin/python bench/embed_api.py [--texts 2000] [--latency 0.05] [--rpm 3000] [--max-inputs 96]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vector_platform.ingest.api_embedder import ApiEmbedder, ApiLimits, count_tokens_function  # noqa: E402
from vector_platform.models import ModelSpec  # noqa: E402
from vector_platform_tests.fault_server import FaultServer  # noqa: E402
from vector_platform_tests.scifact import texts_and_vectors  # noqa: E402

SPEC = ModelSpec("bench_api", "openai", "all-minilm-l6-v2", 384, max_tokens=8191)


def naive(server: FaultServer, texts: list[str], batch: int) -> tuple[float, int]:
    """One batch at a time, cookbook retries: random exponential wait between 1 and 60 s, 6 tries."""
    import openai

    client = openai.OpenAI(api_key="bench", base_url=server.base_url, max_retries=0, timeout=60)
    started = time.perf_counter()
    done = 0
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        for attempt in range(6):
            try:
                response = client.embeddings.create(model=SPEC.model_name, input=chunk, encoding_format="float")
                done += len(response.data)
                break
            except (openai.RateLimitError, openai.APIStatusError, openai.APIConnectionError):
                if attempt == 5:
                    raise
                time.sleep(max(1.0, random.uniform(0, min(60.0, 1.0 * 2**attempt))))
    client.close()
    return done / (time.perf_counter() - started), done


def ours(server: FaultServer, texts: list[str], max_inputs: int) -> tuple[float, ApiEmbedder]:
    embedder = ApiEmbedder(SPEC, api_key="bench", base_url=server.base_url, limits=ApiLimits(max_inputs_per_request=max_inputs, max_in_flight=8))
    started = time.perf_counter()
    vectors = embedder.embed(texts)
    elapsed = time.perf_counter() - started
    assert all(isinstance(v, np.ndarray) for v in vectors), "every text must come back embedded"
    return len(texts) / elapsed, embedder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per request at the server")
    parser.add_argument("--rpm", type=float, default=3000, help="the server's requests-per-minute limit")
    parser.add_argument("--max-inputs", type=int, default=96, help="the server's inputs-per-request limit")
    parser.add_argument("--max-tokens-per-request", type=int, default=300_000)
    args = parser.parse_args()

    texts, known = texts_and_vectors(args.texts)
    count = count_tokens_function("cl100k_base")
    mean_tokens = sum(count(t) for t in texts) / len(texts)
    # What one request may carry: the input limit, or fewer when the token budget binds first.
    allowed = min(args.max_inputs, int(args.max_tokens_per_request // mean_tokens))
    print(f"{len(texts)} SciFact abstracts, {mean_tokens:.0f} tokens each on average; server: {args.latency * 1000:.0f} ms/request, "
          f"{args.max_inputs} inputs/request, {args.rpm:.0f} requests/minute; inputs per request allowed: {allowed}")
    server = FaultServer(known=known, seed=1).start()
    server.faults.latency_s = args.latency
    server.faults.rpm_limit = args.rpm
    server.faults.max_inputs = args.max_inputs
    speedups, fill_under_429 = [], 0.0
    try:
        for label, rate_429 in (("no faults", 0.0), ("30% 429", 0.30)):
            server.faults.rate_429 = rate_429
            server._recent.clear()
            server.counters.reset()
            naive_rate, _ = naive(server, texts, args.max_inputs)
            naive_requests = server.counters.requests
            server._recent.clear()
            server.counters.reset()
            our_rate, embedder = ours(server, texts, args.max_inputs)
            stats = embedder.stats
            fill = (stats.inputs_sent / stats.requests) / allowed
            speedups.append(our_rate / naive_rate)
            if rate_429:
                fill_under_429 = fill
            print(f"{label:>9}: ours {our_rate:8.1f} chunks/s ({stats.requests} requests, {stats.throttled_429} x 429, "
                  f"{stats.seconds_throttled:.1f} s throttled, fill {fill:.2f}) | naive {naive_rate:7.1f} chunks/s "
                  f"({naive_requests} requests) | speedup {our_rate / naive_rate:.2f}")
    finally:
        server.stop()
    print(f"speedup_vs_naive={min(speedups):.2f}")
    print(f"batch_fill_under_429={fill_under_429:.3f}")


if __name__ == "__main__":
    main()
