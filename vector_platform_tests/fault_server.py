"""An OpenAI-compatible embeddings server on 127.0.0.1 that misbehaves on purpose.

`POST /v1/embeddings` answers with real vectors (the precomputed all-MiniLM-L6-v2 SciFact
vectors for texts it knows, a fixed random projection of bag-of-words otherwise) and injects
faults at set rates: 429 with retry-after-ms, 500/503, stalls past the client's timeout,
dropped connections, truncated JSON, wrong dimensions, NaN. Inputs containing a poison
marker get a 400 naming them. It can be "down" (503 for everything) until a given time,
and counts requests and inputs so tests can assert on them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import socket
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@dataclass
class Faults:
    rate_429: float = 0.0
    rate_5xx: float = 0.0
    rate_timeout: float = 0.0
    rate_drop: float = 0.0
    rate_truncated: float = 0.0
    rate_wrong_dims: float = 0.0
    rate_nan: float = 0.0
    retry_after_ms: int = 100
    stall_s: float = 5.0
    latency_s: float = 0.0
    poison_marker: str | None = None
    forbidden_marker: str | None = None  # a 403 for any request holding it (a key without access)
    echo_key_marker: str | None = None  # a 401 quoting the caller's key back, as some gateways answer
    down_until: float = 0.0  # time.monotonic() before which every request gets a 503
    max_inputs: int | None = None  # a 400 above this many inputs, as real APIs do
    rpm_limit: float | None = None  # a real rate limit: 429 once exceeded (a sliding minute)


@dataclass
class Counters:
    requests: int = 0
    ok_requests: int = 0
    inputs: int = 0
    faults: Counter = field(default_factory=Counter)
    texts: Counter = field(default_factory=Counter)  # inputs answered with vectors

    def reset(self) -> None:
        self.requests = self.ok_requests = self.inputs = 0
        self.faults.clear()
        self.texts.clear()


class FaultServer:
    def __init__(self, dims: int = 384, known: dict[str, np.ndarray] | None = None, seed: int = 0, space=None):
        """`space`: maps the vector the server would answer to another model's vector space
        (a rotation, a projection) or, given "random", answers a random vector per text."""
        self.dims = dims
        self.known = known or {}
        self.space = space
        self.faults = Faults()
        self.counters = Counters()
        self.random = random.Random(seed)
        self._recent: list[float] = []
        self._lock = threading.Lock()
        app = Starlette(routes=[Route("/v1/embeddings", self._embeddings, methods=["POST"])])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FaultServer":
        self._thread.start()
        deadline = time.time() + 20
        while not self._server.started and time.time() < deadline:
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def vector(self, text: str) -> np.ndarray:
        if self.space == "random":
            vec = np.random.default_rng(zlib.crc32(text.encode())).standard_normal(self.dims).astype(np.float32)
            return vec / np.linalg.norm(vec)
        if self.space is not None:
            return self.space(self._base_vector(text))
        return self._base_vector(text)

    def _base_vector(self, text: str) -> np.ndarray:
        if text in self.known:
            return self.known[text]
        dims = len(next(iter(self.known.values()))) if self.known else self.dims  # the base space's
        vec = np.zeros(dims, np.float32)
        for token in text.lower().split()[:256]:
            vec += np.random.default_rng(zlib.crc32(token.encode())).standard_normal(dims).astype(np.float32)
        norm = np.linalg.norm(vec)
        return vec / norm if norm else vec

    def _roll(self, rate: float) -> bool:
        return rate > 0 and self.random.random() < rate

    async def _embeddings(self, request: Request) -> Response:
        body = await request.json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        encoding = body.get("encoding_format") or "float"
        f = self.faults
        with self._lock:
            self.counters.requests += 1
            self.counters.inputs += len(inputs)
            now = time.monotonic()
            self._recent = [t for t in self._recent if now - t < 60]
            over_limit = f.rpm_limit is not None and len(self._recent) >= f.rpm_limit
            if not over_limit:
                self._recent.append(now)
            # One roll picks at most one fault for this request.
            roll = self.random.random()
        if f.latency_s:
            await asyncio.sleep(f.latency_s)
        if time.monotonic() < f.down_until:
            return self._fault("down", JSONResponse({"error": {"message": "service unavailable"}}, status_code=503))
        if over_limit:
            wait_ms = int(60_000 / f.rpm_limit)
            return self._fault("429", JSONResponse({"error": {"message": "rate limit"}}, 429, {"retry-after-ms": str(wait_ms)}))
        if f.max_inputs and len(inputs) > f.max_inputs:
            return JSONResponse({"error": {"message": f"too many inputs: {len(inputs)} > {f.max_inputs}"}}, status_code=400)
        if f.echo_key_marker and any(f.echo_key_marker in text for text in inputs):
            key = request.headers.get("authorization", "").removeprefix("Bearer ")
            return self._fault("echo_key", JSONResponse({"error": {"message": f"Incorrect API key provided: {key}"}}, status_code=401))
        if f.forbidden_marker and any(f.forbidden_marker in text for text in inputs):
            return self._fault("forbidden", JSONResponse({"error": {"message": "this key may not embed that"}}, status_code=403))
        if f.poison_marker:
            for i, text in enumerate(inputs):
                if f.poison_marker in text:
                    return self._fault("poison", JSONResponse({"error": {"message": f"input[{i}] is invalid: contains a forbidden token"}}, status_code=400))
        for name, rate in (
            ("429", f.rate_429), ("5xx", f.rate_5xx), ("timeout", f.rate_timeout), ("drop", f.rate_drop),
            ("truncated", f.rate_truncated), ("wrong_dims", f.rate_wrong_dims), ("nan", f.rate_nan),
        ):
            if roll < rate:
                return await self._inject(name, inputs, encoding)
            roll -= rate
        return self._answer(inputs, encoding=encoding)

    def _fault(self, name: str, response: Response) -> Response:
        with self._lock:
            self.counters.faults[name] += 1
        return response

    async def _inject(self, name: str, inputs: list[str], encoding: str) -> Response:
        f = self.faults
        if name == "429":
            return self._fault(name, JSONResponse({"error": {"message": "Rate limit reached"}}, 429, {"retry-after-ms": str(f.retry_after_ms)}))
        if name == "5xx":
            return self._fault(name, JSONResponse({"error": {"message": "upstream error"}}, status_code=self.random.choice([500, 503])))
        if name == "timeout":
            response = self._fault(name, self._answer(inputs, count=False, encoding=encoding))  # counted now, sent too late
            await asyncio.sleep(f.stall_s)
            return response
        if name == "drop":  # promise more bytes than we send: the client sees the connection cut
            return self._fault(name, Response(b'{"data": [', headers={"content-length": "100000"}, media_type="application/json"))
        if name == "truncated":
            return self._fault(name, Response(b'{"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1,', media_type="application/json"))
        vectors = [self.vector(t) for t in inputs]
        if name == "wrong_dims":
            vectors[0] = vectors[0][:-1]
        else:
            vectors[0] = vectors[0].copy()
            vectors[0][0] = np.nan
        return self._fault(name, Response(self._payload(vectors, encoding), media_type="application/json"))

    def _payload(self, vectors, encoding: str = "float") -> bytes:
        if encoding == "base64":
            data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(np.asarray(v, "<f4").tobytes()).decode()}
                    for i, v in enumerate(vectors)]
        else:  # json.dumps writes a NaN as the bare token NaN, as broken servers send it
            data = [{"object": "embedding", "index": i, "embedding": [float(x) for x in v]} for i, v in enumerate(vectors)]
        return json.dumps({"object": "list", "data": data, "model": "test", "usage": {"prompt_tokens": 0, "total_tokens": 0}}).encode()

    def _answer(self, inputs: list[str], count: bool = True, encoding: str = "float") -> Response:
        if count:
            with self._lock:
                self.counters.ok_requests += 1
                self.counters.texts.update(inputs)
        return Response(self._payload([self.vector(t) for t in inputs], encoding), media_type="application/json")
