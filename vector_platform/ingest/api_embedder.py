"""Embedding through any OpenAI-compatible API (OpenAI, Azure, vLLM, TEI, Ollama, LiteLLM).

What it does about the failures users of other tools complain about:
- requests are packed to the API's limits (inputs and tokens per request, tokens per input),
  with tokens counted offline by `bpe-openai` (tiktoken downloads its tables at run time);
- asyncio with a bounded number of requests in flight and one shared requests-per-minute /
  tokens-per-minute budget;
- one retry policy (the SDK's own retries are off): exponential backoff with full jitter on
  429, 5xx, timeouts, connection errors and malformed responses; `retry-after-ms` /
  `Retry-After` honoured, and a 429 pauses every worker, not just the one that got it;
  retried inputs stay in their batch;
- a circuit breaker: when most recent requests fail, all requests pause, then one probe
  goes out before the rest resume;
- poison isolation: a 400 splits the batch in halves until the offending input is alone;
  only it is rejected, with the API's message;
- responses are validated (one finite vector of the right size per input) before use.

`embed()` returns, per input, a vector or an `InputRejected` with the reason; the caller's
gate turns rejections into dead letters.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from vector_platform.ingest.chunking import Chunker
from vector_platform.ingest.embedders import FatalEmbedderError, InputRejected
from vector_platform.models import ModelSpec
from vector_platform.telemetry.logs import redact, register_secret


# Malformed answers for one batch before it is split to find the input they come from.
MAX_BAD_RESPONSES = 3


@dataclass
class ApiLimits:
    max_inputs_per_request: int = 2048
    max_tokens_per_request: int = 300_000
    max_tokens_per_input: int = 8192
    max_in_flight: int = 8
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    timeout_s: float = 60.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    # A batch gives up (its inputs are rejected, to be replayed later) after this long.
    give_up_after_s: float = 600.0
    breaker_window: int = 10
    breaker_min_requests: int = 4
    breaker_failure_rate: float = 0.6
    breaker_cooldown_s: float = 2.0
    breaker_max_cooldown_s: float = 30.0

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "ApiLimits":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in options.items() if k in names})


@dataclass
class ApiStats:
    requests: int = 0
    successful_requests: int = 0
    inputs_sent: int = 0
    tokens_sent: int = 0
    retries: int = 0
    throttled_429: int = 0
    server_errors: int = 0
    timeouts: int = 0
    connection_errors: int = 0
    bad_responses: int = 0
    splits: int = 0
    rejected: int = 0
    breaker_opens: int = 0
    seconds_throttled: float = 0.0  # wall-clock time during which sending waited (not summed per worker)
    _throttled_until: float = field(default=0.0, repr=False)

    def throttle(self, seconds: float) -> None:
        """Count a wait of `seconds` starting now, overlapping waits of other workers once."""
        start = time.monotonic()
        end = start + seconds
        if end > self._throttled_until:
            self.seconds_throttled += end - max(start, self._throttled_until)
            self._throttled_until = end

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        data["seconds_throttled"] = round(self.seconds_throttled, 3)
        return data


@dataclass
class _Job:
    batch: list[int]
    attempt: int = 0
    bad_responses: int = 0
    started: float | None = None  # first time it was sent: the give-up clock starts then, not in the queue


class FatalApiError(FatalEmbedderError):
    """Misconfiguration (401, 403, 404): retrying cannot help, so the step fails loudly."""


def count_tokens_function(encoding_name: str):
    import bpe_openai

    encoding = bpe_openai.get_encoding(encoding_name)
    return lambda text: len(encoding.encode(text))


def pack(token_counts: Sequence[int], max_inputs: int, max_tokens: int) -> list[list[int]]:
    """Greedy, order-preserving packing of input indices into requests within both limits."""
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for index, count in enumerate(token_counts):
        if current and (len(current) >= max_inputs or tokens + count > max_tokens):
            batches.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += count
    if current:
        batches.append(current)
    return batches


class _Budget:
    """Shared requests/tokens-per-minute budget (token buckets), plus a global pause after 429s."""

    def __init__(self, rpm: float | None, tpm: float | None, stats: ApiStats):
        self.rpm, self.tpm, self.stats = rpm, tpm, stats
        now = time.monotonic()
        self.request_tokens, self.token_tokens, self.updated = (rpm or 0.0), (tpm or 0.0), now
        self.paused_until = 0.0
        self.lock: asyncio.Lock | None = None

    def bind(self) -> None:
        """A lock for this event loop: the budget itself outlives each embed() call."""
        self.lock = asyncio.Lock()

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    async def acquire(self, tokens: int) -> None:
        if self.lock is None:
            self.bind()
        while True:
            async with self.lock:
                now = time.monotonic()
                wait = self.paused_until - now
                if wait <= 0:
                    elapsed, self.updated = now - self.updated, now
                    if self.rpm:
                        self.request_tokens = min(self.rpm, self.request_tokens + elapsed * self.rpm / 60)
                    if self.tpm:
                        self.token_tokens = min(self.tpm, self.token_tokens + elapsed * self.tpm / 60)
                    need_r = 0.0 if not self.rpm or self.request_tokens >= 1 else (1 - self.request_tokens) * 60 / self.rpm
                    cost = min(tokens, self.tpm or tokens)  # a request larger than the whole budget waits for a full bucket
                    need_t = 0.0 if not self.tpm or self.token_tokens >= cost else (cost - self.token_tokens) * 60 / self.tpm
                    wait = max(need_r, need_t)
                    if wait <= 0:
                        if self.rpm:
                            self.request_tokens -= 1
                        if self.tpm:
                            self.token_tokens -= cost
                        return
            self.stats.throttle(wait)
            await asyncio.sleep(wait)


class _Breaker:
    """Closed -> open when the recent failure rate spikes -> half-open: one probe -> closed."""

    def __init__(self, limits: ApiLimits, stats: ApiStats):
        self.limits, self.stats = limits, stats
        self.outcomes: deque[bool] = deque(maxlen=limits.breaker_window)
        self.open_until = 0.0
        self.cooldown = limits.breaker_cooldown_s
        self.probing = False

    async def admit(self) -> bool:
        """Wait until a request may go out; True when it is the half-open probe."""
        while True:
            now = time.monotonic()
            if self.open_until == 0.0:
                return False
            if now < self.open_until:
                wait = self.open_until - now
                self.stats.throttle(wait)
                await asyncio.sleep(wait)
                continue
            if not self.probing:
                self.probing = True
                return True
            await asyncio.sleep(0.05)

    def record(self, ok: bool, probe: bool) -> None:
        if probe:
            self.probing = False
            if ok:
                self.open_until, self.cooldown = 0.0, self.limits.breaker_cooldown_s
                self.outcomes.clear()
            else:
                self.cooldown = min(self.cooldown * 2, self.limits.breaker_max_cooldown_s)
                self.open_until = time.monotonic() + self.cooldown
            return
        self.outcomes.append(ok)
        failures = self.outcomes.count(False)
        if (
            self.open_until == 0.0
            and len(self.outcomes) >= self.limits.breaker_min_requests
            and failures / len(self.outcomes) >= self.limits.breaker_failure_rate
        ):
            self.stats.breaker_opens += 1
            self.open_until = time.monotonic() + self.cooldown
            self.outcomes.clear()


def _retry_after(response) -> float | None:
    if response is None:
        return None
    headers = response.headers
    if headers.get("retry-after-ms"):
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    if headers.get("retry-after"):
        try:
            return float(headers["retry-after"])
        except ValueError:
            return None
    return None


class ApiEmbedder:
    """An Embedder for `provider="openai"` model specs."""

    def __init__(self, spec: ModelSpec, api_key: str | None = None, base_url: str | None = None, limits: ApiLimits | None = None):
        self.spec = spec
        options = dict(spec.options)
        self.base_url = base_url or options.get("base_url") or os.environ.get("OPENAI_BASE_URL")
        self._api_key = api_key or os.environ.get(options.get("api_key_env", "OPENAI_API_KEY")) or "unused"
        register_secret(self._api_key)  # masked in logs wherever it came from
        self.limits = limits or ApiLimits.from_options(options)
        self.dimensions = options.get("dimensions")
        # base64 (what the OpenAI API and SDK default to) is decoded by numpy in one go; some
        # servers only speak "float" (a JSON list per vector), which costs far more CPU to parse.
        self.encoding_format = options.get("encoding_format", "base64")
        self.count_tokens = count_tokens_function(options.get("encoding", "cl100k_base"))
        self.stats = ApiStats()
        # One requests/tokens-per-minute budget for the embedder's life, not one per call:
        # a second call right after a busy first one must not start with a full bucket.
        self.budget = _Budget(self.limits.requests_per_minute, self.limits.tokens_per_minute, self.stats)
        # After a batch gave up, later calls fail fast for a while instead of each waiting
        # give_up_after_s: their inputs become dead letters at once, and the replay sensor
        # brings them back once the API answers again.
        self.unavailable_until = 0.0
        self.unavailable_reason = ""
        # Inputs per pipeline batch: one cache file each, so a killed run resumes from there.
        self.pipeline_batch = int(options.get("pipeline_batch", self.limits.max_inputs_per_request * 2))

    def make_chunker(self, max_tokens: int, overlap: int) -> Chunker:
        return Chunker.from_token_counter(self.count_tokens, max_tokens, overlap)

    def batch_size(self, default: int) -> int:
        return self.pipeline_batch

    def counters(self) -> dict[str, float]:
        return self.stats.as_dict()

    def embed(self, texts: Sequence[str]) -> list[np.ndarray | InputRejected]:
        results: list[np.ndarray | InputRejected | None] = [None] * len(texts)
        counts = []
        for i, text in enumerate(texts):
            n = self.count_tokens(text)
            counts.append(n)
            if not text.strip():
                results[i] = InputRejected("empty input")
            elif n > self.limits.max_tokens_per_input:
                results[i] = InputRejected(f"input has {n} tokens, over the limit of {self.limits.max_tokens_per_input}")
        sendable = [i for i, r in enumerate(results) if r is None]
        if sendable and time.monotonic() < self.unavailable_until:
            for i in sendable:
                results[i] = InputRejected(f"API unavailable, not tried: {self.unavailable_reason}")
            sendable = []
        batches = [
            [sendable[j] for j in batch]
            for batch in pack([counts[i] for i in sendable], self.limits.max_inputs_per_request, self.limits.max_tokens_per_request)
        ]
        if batches:
            _run_coroutine(self._run(texts, counts, batches, results))
        self.stats.rejected += sum(isinstance(r, InputRejected) for r in results)
        return results  # type: ignore[return-value]

    async def _run(self, texts, counts, batches, results) -> None:
        import openai

        client = openai.AsyncOpenAI(
            api_key=self._api_key, base_url=self.base_url, max_retries=0, timeout=self.limits.timeout_s,
            http_client=openai.DefaultAsyncHttpxClient(verify=_tls_context()),
        )
        budget = self.budget
        budget.bind()
        breaker = _Breaker(self.limits, self.stats)
        queue: asyncio.Queue = asyncio.Queue()
        for batch in batches:
            queue.put_nowait(_Job(batch))
        pending = len(batches)
        done = asyncio.Event()
        fatal: list[BaseException] = []

        async def worker() -> None:
            nonlocal pending
            while not done.is_set():
                try:
                    job = await asyncio.wait_for(queue.get(), timeout=0.1)
                except asyncio.TimeoutError:
                    continue
                try:
                    follow_ups = await self._attempt(client, budget, breaker, texts, counts, job, results)
                except FatalApiError as err:
                    fatal.append(err)
                    done.set()
                    return
                for item in follow_ups:
                    queue.put_nowait(item)
                pending += len(follow_ups) - 1
                if pending == 0:
                    done.set()

        try:
            await asyncio.gather(*(worker() for _ in range(self.limits.max_in_flight)))
        finally:
            await client.close()
        if fatal:
            raise fatal[0]

    async def _attempt(self, client, budget, breaker, texts, counts, job: _Job, results) -> list[_Job]:
        """Send one batch once. Returns what goes back on the queue (the same batch, or halves)."""
        import openai

        batch = job.batch
        tokens = sum(counts[i] for i in batch)
        await budget.acquire(tokens)
        probe = await breaker.admit()
        if job.started is None:
            job.started = time.monotonic()
        self.stats.requests += 1
        self.stats.inputs_sent += len(batch)
        self.stats.tokens_sent += tokens
        error: str | None = None
        delay: float | None = None
        try:
            kwargs = {"model": self.spec.model_name, "input": [texts[i] for i in batch], "encoding_format": self.encoding_format}
            if self.dimensions:
                kwargs["dimensions"] = self.dimensions
            raw = await client.embeddings.with_raw_response.create(**kwargs)
            response = raw.parse()
            vectors = self._validate(response, len(batch))
            breaker.record(True, probe)
            self.stats.successful_requests += 1
            for i, vec in zip(batch, vectors):
                results[i] = vec
            return []
        except openai.RateLimitError as err:
            # Throttling, not failure: every worker pauses for what the server asked.
            self.stats.throttled_429 += 1
            delay = _retry_after(err.response) or self._backoff(job.attempt)
            budget.pause(delay)
            breaker.record(True, probe)
            error = f"429 rate limited: {_said(err)}"
        except (openai.BadRequestError, openai.UnprocessableEntityError) as err:
            breaker.record(True, probe)
            if len(batch) == 1:
                results[batch[0]] = InputRejected(f"API rejected the input ({err.status_code}): {_said(err)}")
                return []
            return self._split(job)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as err:
            raise FatalApiError(f"embedding API refused the request ({err.status_code}): {_said(err)}") from None
        except openai.APITimeoutError:
            self.stats.timeouts += 1
            breaker.record(False, probe)
            error = f"timed out after {self.limits.timeout_s} s"
        except openai.APIConnectionError as err:
            self.stats.connection_errors += 1
            breaker.record(False, probe)
            error = f"connection error: {err}"
        except openai.APIStatusError as err:
            self.stats.server_errors += 1
            breaker.record(False, probe)
            delay = _retry_after(err.response)
            error = f"HTTP {err.status_code}: {_said(err)}"
        except (_BadResponse, ValueError, openai.APIResponseValidationError) as err:
            self.stats.bad_responses += 1
            breaker.record(False, probe)
            error = f"malformed response: {err}"
            job.bad_responses += 1
            if job.bad_responses >= MAX_BAD_RESPONSES:
                # The same answer again and again: find the input it belongs to, as for a 400.
                if len(batch) == 1:
                    results[batch[0]] = InputRejected(f"no valid vector after {job.bad_responses} attempts: {err}")
                    return []
                return self._split(job)
        # A transient failure: the same batch goes back, whole, after a backoff.
        if time.monotonic() - job.started > self.limits.give_up_after_s:
            reason = f"gave up after {job.attempt + 1} attempts; last error: {error}"
            for i in batch:
                results[i] = InputRejected(reason)
            self.unavailable_until, self.unavailable_reason = time.monotonic() + self.limits.give_up_after_s, reason
            return []
        self.stats.retries += 1
        await asyncio.sleep(delay if delay is not None else self._backoff(job.attempt))
        job.attempt += 1
        return [job]

    def _split(self, job: _Job) -> list[_Job]:
        self.stats.splits += 1
        half = len(job.batch) // 2
        return [_Job(job.batch[:half]), _Job(job.batch[half:])]

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.limits.backoff_max_s, self.limits.backoff_base_s * 2**attempt))

    def _validate(self, response, expected: int) -> list[np.ndarray]:
        data = sorted(response.data, key=lambda d: d.index)
        if len(data) != expected or [d.index for d in data] != list(range(expected)):
            raise _BadResponse(f"{len(data)} vectors for {expected} inputs")
        dims = self.dimensions or self.spec.dims
        vectors = []
        for d in data:
            if isinstance(d.embedding, str):
                vec = np.frombuffer(base64.b64decode(d.embedding), dtype="<f4")
            else:
                vec = np.asarray(d.embedding, dtype=np.float32)
            if vec.shape != (dims,):
                raise _BadResponse(f"vector of {vec.shape[0] if vec.ndim else 0} dims, expected {dims}")
            if not np.isfinite(vec).all():
                raise _BadResponse("vector with NaN or inf")
            vectors.append(vec)
        return vectors


class _BadResponse(Exception):
    pass


def _said(err) -> str:
    """What the API answered, masked: some gateways quote the key they refused, and this text
    goes into dead letters, step failures and logs."""
    return redact(err.message)


@functools.cache
def _tls_context():
    """The HTTP library's default TLS context (the same trust store and SSL_CERT_* rules), built
    once per process. A client built without one loads the CA certificates on every call, even
    for http:// URLs: 35-230 ms of CPU per query embedding here, measured by the soak."""
    from openai import _base_client

    library = getattr(_base_client, "httpx2", None) or getattr(_base_client, "httpx", None)
    create = getattr(library, "create_ssl_context", None)
    return create() if create else True  # True: the library's default, built per client


def _run_coroutine(coroutine) -> None:
    """asyncio.run, also from code that already runs an event loop (a notebook): in a thread then."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coroutine)
        return
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coroutine).result()
