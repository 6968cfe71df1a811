"""The HTTP search API under attack, proving what `vector_platform/http.py` claims: keys
compared in constant time (hmac.compare_digest against every key) and a 401 that says
nothing more; bodies bounded (413), chunked ones too; k bounded; hostile bodies and paths a
4xx, never a 500; an internal error a 500 without a stack trace, a path or the exception's
text; `vector-platform serve` bound to 127.0.0.1 only.

Property tests call the app in this process (`asgi.call`); a real `serve` process takes what
needs the transport (chunked uploads, header limits, the bound interface)."""

from __future__ import annotations

import datetime as dt
import hmac
import http.client
import json
import math
import os
import socket
import subprocess
import time

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vector_platform.http import SEARCH_FIELDS, create_app

from ..conftest import cli, cli_env
from .asgi import call
from .hostile import (
    CORE, DEEP_JSON, HUGE_NUMBERS, INJECTIONS, PAYLOADS, TARGETED_FILTERS, Sentinel, any_text, bounded, every, json_objects,
    json_values, numbers, shared_collections,
)

KEYS = {"alice": "alice-key-" + "a" * 32, "bob": "bob-key-" + "b" * 32}
ALICE = {"x-api-key": KEYS["alice"]}
OK_STATUSES = {200, 400, 404, 413, 422}


@pytest.fixture(scope="module")
def served(pg_dsn, dagster_instance, tmp_path_factory):
    """The app over the shared collections, with two named keys; the sentinel guards the rest."""
    shared = shared_collections(pg_dsn, dagster_instance, tmp_path_factory)
    saved = {k: os.environ.pop(k, None) for k in ("VP_API_KEY", "VP_API_KEYS", "VP_HTTP_MAX_K", "VP_AUDIT")}
    os.environ["VP_API_KEYS"] = ",".join(f"{name}:{key}" for name, key in KEYS.items())
    try:
        app = create_app(platform=shared.vp)
    finally:
        os.environ.pop("VP_API_KEYS")
        os.environ.update({k: v for k, v in saved.items() if v is not None})
    sentinel = Sentinel(pg_dsn).plant()
    yield app, shared, sentinel
    sentinel.check()
    sentinel.remove()


def _no_leak(answer) -> None:
    """An error body is JSON with one `error` string and nothing of the server's insides."""
    body = answer.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    for leak in ("Traceback", "psycopg", "File \"", ".py", "/work", "site-packages", "SQLSTATE", "syntax error at"):
        assert leak not in body["error"], (leak, body)


def _search(app, body, headers=ALICE):
    raw = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    return call(app, "POST", "/search", [("content-type", "application/json"), *headers.items()], raw)


# ---------------------------------------------------------------- bodies

offsets = st.builds(lambda m: dt.timezone(dt.timedelta(minutes=m)), st.integers(-1439, 1439))
instants = st.one_of(
    any_text,
    st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30), timezones=st.one_of(st.none(), offsets))
    .map(lambda d: d.isoformat()),
    st.sampled_from(["0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", "2024-02-30", "2024-01-01T25:00"]),
)
field_values = {
    "query": st.one_of(any_text, st.none(), numbers, json_values),
    "vector": st.one_of(st.lists(numbers, min_size=384, max_size=384), st.lists(st.floats(-1, 1), max_size=390), json_values),
    "fingerprint": st.one_of(any_text, st.text("0123456789abcdef", min_size=16, max_size=16), json_values),
    "collections": st.one_of(st.lists(any_text, min_size=1, max_size=3), json_values),
    "k": st.one_of(st.integers(-3, 105), numbers, json_values),
    "filters": st.one_of(json_objects, json_values),
    "exact": st.one_of(st.booleans(), json_values),
    "include_archive": st.one_of(st.booleans(), json_values),
    "consistent": st.one_of(st.booleans(), json_values),
    "since": st.one_of(instants, json_values),
    "until": st.one_of(instants, json_values),
}


ACTIVE, COLD = "@active", "@cold"  # placeholders for the shared collections' names
RAW_BODIES = [t.encode() for t in DEEP_JSON] + [
    b"", b"null", b"[]", b"1e999", b"9" * 5000, b'{"k": 1e999}', b'{"k": NaN}', b'{"query": "a", "k": Infinity}',
    b"\xff\xfe{}", b'{"query": "\\ud800", "collections": ["@active"]}', b'{"collections": ["\\u0000"], "query": "a"}',
    '{"query": "\u00e9"}'.encode("latin-1"), b'{"query": "a", "query": "b"}', b"{" * 10_000, b'{"filters": ' * 3000]


@st.composite
def search_bodies(draw):
    """A search body with some fields hostile (the rest sensible), or hostile bytes."""
    kind = draw(st.sampled_from(["fields", "fields", "fields", "unknown_field", "raw"]))
    if kind == "raw":
        return draw(st.one_of(st.binary(max_size=200), st.sampled_from(RAW_BODIES)))
    body = {"query": "alpha beta", "collections": [ACTIVE, COLD], "k": 5}
    for name in draw(st.lists(st.sampled_from(sorted(SEARCH_FIELDS)), min_size=1, max_size=3, unique=True)):
        body[name] = draw(field_values[name])
    if kind == "unknown_field":
        body[draw(any_text)] = draw(json_values)
    return body


def _named(body, shared):
    """The body with the placeholders replaced by the shared collections' names."""
    names = {ACTIVE: shared.active, COLD: shared.cold}
    if isinstance(body, bytes):
        return body.replace(ACTIVE.encode(), shared.active.encode())
    if isinstance(body, dict) and isinstance(body.get("collections"), list):
        return {**body, "collections": [names.get(c, c) if isinstance(c, str) else c for c in body["collections"]]}
    return body


@bounded(60)
@every("body", RAW_BODIES)
@every("body", [{"query": p, "collections": [ACTIVE]} for p in CORE] + [{"query": "a", "collections": [p]} for p in CORE])
@every("body", [{"query": "a", "collections": [ACTIVE, COLD], "filters": f} for f in TARGETED_FILTERS[:-5]]
       + [{"vector": [x] * 384, "collections": [ACTIVE, COLD]} for x in HUGE_NUMBERS]
       + [{"query": "a", "collections": [ACTIVE], "since": s} for s in ("0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59")]
       + [{"query": "a", "collections": [ACTIVE], "k": k} for k in (0, 101, 10**400, 2.0, True, "5", None)])
@given(body=search_bodies())
def test_hostile_search_bodies_are_a_4xx_with_a_plain_error_never_a_500(served, body):
    app, shared, sentinel = served
    body = _named(body, shared)
    answer = _search(app, body)
    assert answer.status in OK_STATUSES, (answer.status, answer.body[:300])
    if answer.status == 200:
        result = answer.json()
        assert set(result) == {"query", "hits", "stats", "warnings"}
        assert len(result["hits"]) <= (body.get("k", 10) if isinstance(body, dict) else 10)
        assert all(isinstance(h["score"], float) and math.isfinite(h["score"]) for h in result["hits"])
    else:
        _no_leak(answer)
    sentinel.check()


@bounded(40)
@every("name", CORE, doc_id="tive1")
@every("doc_id", CORE + ["a0/../a1", "tive1/../tive2", "%2e%2e"], name="x")
@given(name=any_text, doc_id=st.one_of(any_text, st.sampled_from(["a0", "../../etc/passwd", "a0/../a1", "%00", "\x00"])))
def test_hostile_document_paths_are_a_404_or_400_never_a_500(served, name, doc_id):
    app, shared, sentinel = served
    for collection in (name, shared.active):
        answer = call(app, "GET", f"/collections/{collection}/documents/{doc_id}", ALICE.items())
        assert answer.status in {200, 400, 404}, (answer.status, answer.body[:300])
        if answer.status != 200:
            _no_leak(answer)
        else:
            assert answer.json()["doc_id"] == doc_id
    sentinel.check()


def test_k_is_bounded_by_the_server_setting(served, monkeypatch):
    app, shared, _ = served
    body = {"query": "alpha", "collections": [shared.active, shared.cold]}
    assert _search(app, {**body, "k": 100}).status == 200
    for k in (101, 1000, 10**400, 0, -1, 2.5, True, "10"):
        answer = _search(app, {**body, "k": k})
        assert answer.status == 400 and "k must be an integer between 1 and 100" in answer.json()["error"], k
    monkeypatch.setenv("VP_HTTP_MAX_K", "7")
    monkeypatch.setenv("VP_API_KEYS", ",".join(f"{n}:{k}" for n, k in KEYS.items()))
    strict = create_app(platform=shared.vp)
    assert _search(strict, {**body, "k": 7}).status == 200
    assert _search(strict, {**body, "k": 8}).status == 400


# ---------------------------------------------------------------- keys

def test_every_key_is_compared_with_hmac_compare_digest_and_a_refusal_says_nothing(served, monkeypatch):
    app, shared, _ = served
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    body = {"query": "alpha", "collections": [shared.active], "k": 2}
    attempts = {
        "missing": [],
        "wrong": [("x-api-key", "wrong")],
        "prefix": [("x-api-key", KEYS["alice"][:-1])],
        "longer": [("x-api-key", KEYS["alice"] + "a")],
        "overlong": [("x-api-key", "k" * 1_000_000)],
        "other case": [("x-api-key", KEYS["alice"].upper())],
        "basic auth": [("authorization", "Basic " + KEYS["alice"])],
        "bearer of nothing": [("authorization", "Bearer ")],
        "latin-1": [("x-api-key", b"\xe9\xff" + KEYS["alice"].encode())],
    }
    for label, headers in attempts.items():
        calls.clear()
        answer = _search(app, body, dict(headers))
        assert answer.status == 401, label
        assert answer.json() == {"error": "missing or wrong API key"} and answer.headers.get("www-authenticate") == "Bearer"
        # every configured key compared (no early exit that would time which one came close)
        assert sorted(b for _, b in calls) == sorted(k.encode() for k in KEYS.values()), label
    for headers in ({"x-api-key": KEYS["bob"]}, {"authorization": f"Bearer {KEYS['alice']}"},
                    {"authorization": f"bearer {KEYS['bob']}"}):
        calls.clear()
        assert _search(app, body, headers).status == 200
        assert len(calls) == len(KEYS)


@bounded(40)
@every("key", [p.encode("utf-8", "surrogatepass") for p in CORE] + [KEYS["alice"].encode(), KEYS["alice"].encode() + b"\x00"])
@given(key=st.one_of(st.binary(max_size=80), st.sampled_from([k.encode() for k in INJECTIONS + PAYLOADS if k.isascii()])))
def test_any_other_key_is_refused_the_same_way(served, key):
    app, shared, _ = served
    answer = call(app, "GET", "/collections", [(b"x-api-key", key)])
    expected = 200 if key.decode("latin-1") in KEYS.values() else 401
    assert answer.status == expected
    if expected == 401:
        assert answer.json() == {"error": "missing or wrong API key"}


# ---------------------------------------------------------------- internal errors

def test_an_internal_error_is_a_500_without_trace_path_or_exception_text(served, monkeypatch, caplog):
    import psycopg

    app, shared, _ = served
    secret = "SECRET-detail /work/vector_platform/search/__init__.py line 99"
    failures = [RuntimeError(secret), psycopg.OperationalError(f"connection failed: password=hunter2 {secret}"),
                RecursionError(secret), MemoryError(secret), AssertionError(secret)]
    for failure in failures:
        def broken(*args, **kwargs):
            raise failure

        monkeypatch.setattr(shared.vp, "search", broken)
        monkeypatch.setattr(shared.vp, "get", broken)
        caplog.clear()
        for answer in (_search(app, {"query": "alpha", "collections": [shared.active]}),
                       call(app, "GET", f"/collections/{shared.active}/documents/a0", ALICE.items())):
            assert answer.status == 500, failure
            assert answer.json() == {"error": "internal error (see the server's log)"}
            _no_leak(answer)
            assert "SECRET" not in answer.body.decode() and "hunter2" not in answer.body.decode()
        assert "request failed" in caplog.text and "Traceback" in caplog.text  # the operator's log has it
    monkeypatch.undo()
    assert _search(app, {"query": "alpha", "collections": [shared.active]}).status == 200


# ---------------------------------------------------------------- a real server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _other_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback."""
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


@pytest.fixture(scope="module")
def serve_process(pg_dsn, tmp_path_factory):
    """`vector-platform serve` as a user starts it (no --host), with a key."""
    tmp = tmp_path_factory.mktemp("serve")
    port = _free_port()
    env = {**cli_env(pg_dsn, tmp), "VP_API_KEY": KEYS["alice"], "VP_HTTP_MAX_BODY_BYTES": str(64 * 1024)}
    proc = subprocess.Popen(cli("serve", "--port", str(port)), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.2)
    yield proc, port
    proc.terminate()
    out = proc.communicate(timeout=30)[0].decode()
    assert "Traceback" not in out, out


def test_serve_listens_on_127_0_0_1_only(serve_process):
    proc, port = serve_process
    listening = [c for c in psutil.Process(proc.pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}, listening
    for address in _other_addresses():
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2).close()


def _raw(port: int, method: str, path: str, headers: dict[str, str], body=None, chunked: bool = False) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        elif body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        try:
            if chunked:
                for piece in body:
                    conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                conn.send(b"0\r\n\r\n")
            elif body is not None:
                conn.send(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (and closed) before the whole body was sent
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_bodies_over_the_limit_are_a_413_declared_or_chunked(serve_process):
    proc, port = serve_process
    key = {"X-API-Key": KEYS["alice"], "Content-Type": "application/json"}
    big = b'{"query": "' + b"a" * 100_000 + b'", "collections": ["x"]}'
    status, body = _raw(port, "POST", "/search", key, big)
    assert status == 413 and json.loads(body) == {"error": "request body over 65536 bytes"}
    # chunked: no content-length to refuse by; the server counts what arrives
    status, body = _raw(port, "POST", "/search", key, [b"[" + b"1," * 4000] * 40, chunked=True)
    assert status == 413 and json.loads(body) == {"error": "request body over 65536 bytes"}
    # under the limit, chunked, is read whole
    status, body = _raw(port, "POST", "/search", key, [b'{"collections": ', b'["no_such_collection"], ', b'"k": 0}'],
                        chunked=True)
    assert status == 400 and "k must be" in json.loads(body)["error"]


def test_the_real_server_refuses_keys_and_headers_without_detail(serve_process):
    proc, port = serve_process
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer " + KEYS["alice"][:-1]}):
        status, body = _raw(port, "GET", "/collections", headers)
        assert status == 401 and json.loads(body) == {"error": "missing or wrong API key"}
    status, body = _raw(port, "GET", "/collections", {"X-API-Key": "k" * 200_000})  # over the server's header limit
    assert 400 <= status < 500 and b"Traceback" not in body and KEYS["alice"].encode() not in body
    status, body = _raw(port, "GET", "/healthz", {"X-API-Key": KEYS["alice"]})
    assert status == 200 and json.loads(body) == {"status": "ok"}
