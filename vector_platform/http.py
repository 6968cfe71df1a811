"""The HTTP search API: a thin Starlette app over `Platform.search`, served by uvicorn.

    POST /search       {"query": "..." | "vector": [...], "collections": [...], "k": 10, "filters": {...}, "exact": false,
                        "include_archive": false, "since": "2024-01-01", "until": "2024-07-01",
                        "fingerprint": "<the model fingerprint a given vector was made with>",
                        "consistent": false}  (true: read the primary, not a replica)
                       -> the same JSON as `vector-platform search --json`
    GET  /collections/{name}/documents/{doc_id}
                       -> one document (`vector-platform get NAME DOC_ID --json`), 404 when unknown
    GET  /collections  -> name, tier, serving model and models of every collection
    GET  /healthz      -> {"status": "ok"} when the database answers
    GET  /metrics      -> Prometheus exposition (`vector_platform.telemetry.metrics`)

With VP_PG_READ_DSN set every route reads through that read-only role (search, documents, the
collection list, health, metrics); the query log and the audit log are written through
VP_PG_DSN.

When VP_API_KEY (one key, named `api-key`) or VP_API_KEYS (`name:key,name2:key2`, one per
caller) is set every request needs a key, as `X-API-Key: <key>` or `Authorization: Bearer
<key>`, compared in constant time against every configured key. With VP_AUDIT=1 each search is
written to the audit log under the key's name (`vector_platform.audit`). Bodies are capped at
VP_HTTP_MAX_BODY_BYTES (default 1 MiB) and k at VP_HTTP_MAX_K (default 100). Errors are JSON
(`{"error": ...}`) without stack traces, and masked like the logs. Binds 127.0.0.1 unless
told otherwise.

/metrics follows the same key rule: its series name every collection and its size, which
is not for anyone who can reach the port (Prometheus sends the key with
`authorization: {credentials: KEY}`). `VP_METRICS_PUBLIC=1` serves /metrics without the key
while every other route still needs it, for a scraper inside a trusted network. The
standalone `vector-platform metrics` server (`serve_metrics`) applies the same rule to the
one route it has.

Every request is logged with a `request_id` and its `route` (`telemetry.logs.log_context`),
and /search with the collections it names.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import logging
import os
import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vector_platform.telemetry import logs

log = logging.getLogger(__name__)
SEARCH_FIELDS = {"query", "vector", "fingerprint", "collections", "k", "filters", "exact", "include_archive", "since", "until",
                 "consistent"}


def _instant(value: Any, name: str) -> dt.datetime | None:
    """An ISO date or date-time (UTC unless it says otherwise), or None."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise HttpError(400, f"{name} must be an ISO date or time string")
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise HttpError(400, f"{name} is not an ISO date or time: {value[:40]!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def _not_json(constant: str) -> Any:
    """Python's json reads NaN and Infinity; JSON has neither."""
    raise ValueError(f"{constant} is not a JSON value")


def _not_found(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, wrong method) as JSON like every other error."""
    return JSONResponse({"error": "not found" if exc.status_code == 404 else str(exc.detail)}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def api_keys(single: str | None = None, named: str | None = None) -> dict[str, str]:
    """{name: key} from VP_API_KEY (named `api-key`) and VP_API_KEYS (`name:key,...`)."""
    single = single if single is not None else os.environ.get("VP_API_KEY") or None
    named = named if named is not None else os.environ.get("VP_API_KEYS") or ""
    keys = {"api-key": single} if single else {}
    for entry in filter(None, (part.strip() for part in named.split(","))):
        name, sep, key = entry.partition(":")
        if not sep or not name.strip() or not key.strip():
            raise ValueError("VP_API_KEYS must look like name:key,name2:key2 (a part has no name or no key)")
        keys[name.strip()] = key.strip()
    return keys


def _principal(request: Request, keys: dict[str, str]) -> str | None:
    """The name of the key the request carries (X-API-Key or a Bearer token), `anonymous` when
    no key is configured, None when the key is missing or wrong. Every key is compared, each in
    constant time."""
    if not keys:
        return "anonymous"
    given = request.headers.get("x-api-key") or ""
    bearer = request.headers.get("authorization") or ""
    if not given and bearer.lower().startswith("bearer "):
        given = bearer[7:]
    found = None
    for name, key in keys.items():
        if hmac.compare_digest(given.encode(), key.encode()):
            found = name
    return found


def _metrics_public() -> bool:
    return os.environ.get("VP_METRICS_PUBLIC", "").strip().lower() in ("1", "true", "yes")


def _metrics_endpoint(pool_factory):
    """GET /metrics over this process's series and the catalog behind `pool_factory`."""
    from vector_platform.telemetry import metrics

    registry = metrics.registry(pool_factory)

    async def endpoint(request: Request) -> Response:
        body, content_type = await run_in_threadpool(metrics.exposition, registry, request.headers.get("accept"))
        return Response(body, media_type=content_type)

    return endpoint


def create_app(platform=None, api_key: str | None = None, max_body_bytes: int | None = None, max_k: int | None = None) -> Starlette:
    """The app. `platform` defaults to `Platform()` on the environment's settings; `api_key`
    to $VP_API_KEY, plus the named keys of $VP_API_KEYS (none set: no key needed)."""
    from vector_platform import audit, catalog
    from vector_platform.api import Platform

    vp = platform or Platform()
    keys = api_keys(single=api_key)
    auditing = audit.enabled()
    max_body = max_body_bytes or int(os.environ.get("VP_HTTP_MAX_BODY_BYTES", str(2**20)))
    k_limit = max_k or int(os.environ.get("VP_HTTP_MAX_K", "100"))

    metrics_open = _metrics_public()

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body:
            raise HttpError(413, f"request body over {max_body} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise HttpError(413, f"request body over {max_body} bytes")
        try:
            return json.loads(body, parse_constant=_not_json)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HttpError(400, f"the body is not JSON ({err})") from None
        except ValueError as err:  # NaN / Infinity, or an integer of more digits than Python reads
            raise HttpError(400, f"the body is not JSON ({str(err)[:120]})") from None
        except RecursionError:
            raise HttpError(400, "the body is not JSON this server reads: nested too deeply") from None

    async def search(request: Request) -> JSONResponse:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise HttpError(400, "the body must be a JSON object")
        unknown = set(body) - SEARCH_FIELDS
        if unknown:
            raise HttpError(400, f"unknown fields: {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(SEARCH_FIELDS))})")
        collections = body.get("collections")
        if not isinstance(collections, list) or not collections or not all(isinstance(c, str) for c in collections):
            raise HttpError(400, "collections must be a non-empty list of names")
        k = body.get("k", 10)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= k_limit:
            raise HttpError(400, f"k must be an integer between 1 and {k_limit}")
        exact = body.get("exact", False)
        if not isinstance(exact, bool):
            raise HttpError(400, "exact must be true or false")
        vector = body.get("vector")
        if vector is not None and (not isinstance(vector, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vector)):
            raise HttpError(400, "vector must be a list of numbers")
        fingerprint = body.get("fingerprint")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise HttpError(400, "fingerprint must be a string (the model fingerprint the vector was made with)")
        query = body.get("query")
        if query is not None and not isinstance(query, str):
            raise HttpError(400, "query must be a string")
        include_archive = body.get("include_archive", False)
        if not isinstance(include_archive, bool):
            raise HttpError(400, "include_archive must be true or false")
        consistent = body.get("consistent", False)
        if not isinstance(consistent, bool):
            raise HttpError(400, "consistent must be true or false")
        window = {name: _instant(body.get(name), name) for name in ("since", "until")}
        started = time.perf_counter()
        result, error = None, None
        try:
            with logs.log_context(collection=",".join(collections)):
                result = await run_in_threadpool(
                    vp.search, query, collections, k=k, exact=exact, vector=vector, filters=body.get("filters"),
                    include_archive=include_archive, fingerprint=fingerprint, consistent=consistent, **window,
                )
        except Exception as err:
            error = str(err)[:500] if isinstance(err, (ValueError, KeyError)) else f"internal error ({err.__class__.__name__})"
            raise
        finally:
            if auditing:
                await run_in_threadpool(
                    audit.record, vp.pool(), principal=request.state.principal, channel="http",
                    client=request.client.host if request.client else None, collections=collections,
                    query_text=query, k=k, results=audit.hits_of(result) if result else [],
                    latency_ms=(time.perf_counter() - started) * 1000, error=logs.redact(error) if error else None,
                )
        return JSONResponse(result.as_json())

    async def collections(request: Request) -> JSONResponse:
        def read():
            with vp.read_pool().connection() as conn:
                return [
                    {"name": c.name, "tier": c.tier, "serving_model": c.serving_model, "models": list(c.models)}
                    for c in catalog.list_collections(conn)
                ]

        return JSONResponse({"collections": await run_in_threadpool(read)})

    async def document(request: Request) -> JSONResponse:
        name, doc_id = request.path_params["name"], request.path_params["doc_id"]
        try:
            doc = await run_in_threadpool(vp.get, name, doc_id)
        except KeyError:
            raise HttpError(404, f"no collection {name!r}") from None
        if doc is None:
            raise HttpError(404, f"no document {doc_id!r} in {name!r}")
        return JSONResponse(json.loads(json.dumps(doc, default=str)))

    async def healthz(request: Request) -> JSONResponse:
        def ping():
            with vp.read_pool().connection() as conn:
                conn.execute("SELECT 1")

        await run_in_threadpool(ping)
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/search", _guarded(search, keys), methods=["POST"]),
            Route("/collections", _guarded(collections, keys), methods=["GET"]),
            Route("/collections/{name}/documents/{doc_id:path}", _guarded(document, keys), methods=["GET"]),
            Route("/healthz", _guarded(healthz, keys), methods=["GET"]),
            Route("/metrics", _guarded(_metrics_endpoint(vp.read_pool), {} if metrics_open else keys), methods=["GET"]),
        ],
        exception_handlers={HTTPException: _not_found},
    )


def _guarded(handler, keys: dict[str, str]):
    """The key check (the key's name is `request.state.principal`), the request's log context,
    and errors as JSON (masked, no stack trace)."""

    async def endpoint(request: Request) -> Response:
        with logs.log_context(request_id=uuid.uuid4().hex[:12], route=request.url.path):
            request.state.principal = _principal(request, keys)
            if request.state.principal is None:
                return JSONResponse({"error": "missing or wrong API key"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            try:
                return await handler(request)
            except HttpError as err:
                return _error(str(err), err.status)
            except (ValueError, KeyError) as err:  # the platform's own input errors (AllArchived included)
                message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
                return _error(str(message), 400)
            except Exception:  # noqa: BLE001 - logged here, never sent to the client
                log.exception("request failed: %s %s", request.method, request.url.path)
                return JSONResponse({"error": "internal error (see the server's log)"}, status_code=500)

    return endpoint


def _error(message: str, status: int) -> JSONResponse:
    """An error answer, masked like the logs. A message may quote the request (an unknown field,
    a name), and JSON text from a client can hold an unpaired surrogate, which UTF-8 cannot
    encode: it is sent escaped (\\ud800) rather than failing the answer."""
    text = logs.redact(message).encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": text}, status_code=status)


def create_metrics_app(pool_factory=None, api_key: str | None = None) -> Starlette:
    """An app with GET /metrics only. `pool_factory` defaults to the environment's database;
    `api_key` to $VP_API_KEY, not required when VP_METRICS_PUBLIC=1."""
    if pool_factory is None:
        from vector_platform.defs.resources import default_resources

        pool_factory = default_resources()["postgres"].pool
    keys = api_keys(single=api_key)
    return Starlette(routes=[Route("/metrics", _guarded(_metrics_endpoint(pool_factory), {} if _metrics_public() else keys),
                                   methods=["GET"])], exception_handlers={HTTPException: _not_found})


def _run(app: Starlette, host: str, port: int) -> None:
    import uvicorn

    # JSON logs: uvicorn must not install its own text handlers; its loggers reach ours.
    json_logs = logs.log_format() == "json"
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                log_config=None if json_logs else uvicorn.config.LOGGING_CONFIG)


def _key_note() -> str:
    if not api_keys():
        return ""
    return "; API key required" + (" (not for /metrics: VP_METRICS_PUBLIC)" if _metrics_public() else "")


def serve(host: str = "127.0.0.1", port: int = 8080, platform=None) -> int:
    app = create_app(platform)
    print(f"serving the search API on http://{host}:{port} (POST /search, GET /collections, GET /healthz, GET /metrics)"
          + _key_note(), flush=True)
    _run(app, host, port)
    return 0


def serve_metrics(host: str = "127.0.0.1", port: int = 9464) -> int:
    """Only GET /metrics: the catalog's series (run figures, tiers, dead letters) and this
    process's own, for a scraper next to the Dagster daemon rather than the search API."""
    app = create_metrics_app()
    print(f"serving Prometheus metrics on http://{host}:{port}/metrics" + _key_note(), flush=True)
    _run(app, host, port)
    return 0
