"""Call an ASGI app in this process, as uvicorn would after parsing a request: fast enough for
property tests of every route (a real server is used where the transport matters: chunked
bodies, header limits, the bound interface)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Iterable
from urllib.parse import quote, unquote


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(app, method: str, path: str, headers: Iterable[tuple[str | bytes, str | bytes]] = (),
         body: bytes = b"", chunks: list[bytes] | None = None) -> Answer:
    """One request: `body` whole (with its content-length), or `chunks` (no content-length, as
    a chunked upload arrives). `path` is the decoded path, as the server hands it on."""
    raw = [(k if isinstance(k, bytes) else k.lower().encode("latin-1"),
            v if isinstance(v, bytes) else v.encode("latin-1")) for k, v in headers]
    if chunks is None:
        raw.append((b"content-length", str(len(body)).encode()))
        chunks = [body]
    # as uvicorn has it: the request target percent-encoded on the wire, unquoted (invalid UTF-8 replaced)
    raw_path = quote(path, safe="/", encoding="utf-8", errors="surrogatepass")
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": unquote(raw_path), "raw_path": raw_path.encode("ascii"), "query_string": b"", "root_path": "",
        "headers": raw, "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080),
    }
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive():
        if pending:
            return pending.pop(0)
        await asyncio.sleep(3600)  # the client waits for the answer

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Answer(start["status"], {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]}, body_out)
