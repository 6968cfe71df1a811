"""Logs: secrets masked in every shape and every place (our handlers, Dagster's event log, the
CLI's and the server's output), and JSON lines that say which run, collection and model."""

import io
import json
import logging
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml
from psycopg import sql

from vector_platform.telemetry import logs

from .conftest import cli, instance_env, write_jsonl
from .fault_server import FaultServer
from .test_metrics import Server

PASSWORD = "pw-" + uuid.uuid4().hex
OPENAI_KEY = "sk-test-" + uuid.uuid4().hex
API_KEY = "vp-key-" + uuid.uuid4().hex
SECRETS = (PASSWORD, OPENAI_KEY, API_KEY)


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("VP_API_KEY", API_KEY)
    monkeypatch.setenv("VP_PG_DSN", f"postgresql://someone:{PASSWORD}@db.internal:5432/vp")


@pytest.mark.parametrize("text, kept", [
    (f"connecting to postgresql://someone:{PASSWORD}@db.internal:5432/vp", "postgresql://someone:***@db.internal:5432/vp"),
    (f"host=db user=someone password={PASSWORD} dbname=vp", "password=*** dbname=vp"),
    (f"host=db password='{PASSWORD}' port=5432", "password='***' port=5432"),
    ("host=db password='an0ther pass' port=5432", "password='***' port=5432"),
    ('{"api_key": "an0ther-Pass", "n": 1}', '{"api_key": "***", "n": 1}'),
    ("postgresql+psycopg2://dagster:an0ther-Pass@/dagster?host=/tmp", "postgresql+psycopg2://dagster:***@/dagster"),
    ("headers: {'Authorization': 'Bearer abcdefghijklmnop', 'x-api-key': 'short1'}", "'Authorization': 'Bearer ***'"),
    ("Authorization: Basic dXNlcjpzZWNyZXQ=", "Authorization: Basic ***"),
    ("X-API-Key: tiny", "X-API-Key: ***"),
    (f"the embedding API said: invalid key {OPENAI_KEY}", "invalid key ***"),
    (f"request with {API_KEY} refused", "with *** refused"),
], ids=["dsn-url", "dsn-keyword", "dsn-quoted", "dsn-quoted-space", "json-key", "sqlalchemy-url", "header-dict",
        "basic-auth", "x-api-key", "openai-key", "vp-api-key"])  # fixed ids: the secrets are random per process
def test_secrets_are_masked_in_every_shape(secret_env, text, kept):
    masked = logs.redact(text)
    assert kept in masked
    assert not any(secret in masked for secret in SECRETS + ("abcdefghijklmnop", "short1", "tiny", "dXNlcjpzZWNyZXQ=", "an0ther-Pass"))


@pytest.mark.parametrize("text", [
    "password authentication failed for user \"someone\"",
    "max_tokens=8191 max_tokens_per_request=300000 api_key_env=MY_KEY",
    "postgresql://postgres:@/vector_platform?host=/tmp/pg",  # the embedded server's DSN has no password
    "testing the gate with a short value",
])
def test_ordinary_text_is_left_alone(monkeypatch, text):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")  # too short to hunt down as a bare word
    assert logs.redact(text) == text


def test_json_lines_carry_context_and_mask_messages_and_tracebacks(secret_env):
    logs.install_redaction()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("vector_platform.test_logging")
    logger.addHandler(handler)
    try:
        with logs.log_context(run_id="r-123", collection="papers", model="minilm_l6_v2"):
            logger.warning("retrying with key %s", OPENAI_KEY)
            try:
                raise ConnectionError(f"could not reach postgresql://someone:{PASSWORD}@db.internal/vp")
            except ConnectionError:
                logger.exception("ingest failed")
        logger.warning("outside any context")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["retrying with key ***", "ingest failed", "outside any context"]
    first = lines[0]
    assert first["level"] == "WARNING" and first["logger"] == "vector_platform.test_logging" and first["time"].endswith("+00:00")
    assert (first["run_id"], first["collection"], first["model"]) == ("r-123", "papers", "minilm_l6_v2")
    assert "ConnectionError" in lines[1]["exception"] and "someone:***@db.internal" in lines[1]["exception"]
    assert "run_id" not in lines[2] and "collection" not in lines[2]
    assert not any(secret in out.getvalue() for secret in SECRETS)


def test_bad_settings_are_refused_with_a_clear_error(monkeypatch):
    monkeypatch.setenv("VP_LOG_FORMAT", "yaml")
    with pytest.raises(ValueError, match="VP_LOG_FORMAT must be one of text, json"):
        logs.log_format()
    monkeypatch.setenv("VP_LOG_FORMAT", "json")
    monkeypatch.setenv("VP_LOG_LEVEL", "LOUD")
    with pytest.raises(ValueError, match="VP_LOG_LEVEL must be a level name"):
        logs.log_level()


def test_a_runs_event_log_is_masked_and_its_console_log_is_json(secret_env, monkeypatch, capfd):
    """What the UI shows of a run (its event log) and what the run prints, with the product's
    dagster.yaml python_logs: context.log and our modules' loggers both masked, and JSON lines
    with the run's id, job, step and partition."""
    monkeypatch.setenv("VP_LOG_FORMAT", "json")
    logs.install_redaction()
    product_yaml = yaml.safe_load((Path(__file__).resolve().parents[1] / "dagster.yaml").read_text())
    partitions = dg.StaticPartitionsDefinition(["papers"])

    @dg.asset(partitions_def=partitions)
    def talkative(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        context.log.info(f"connecting to postgresql://someone:{PASSWORD}@db.internal/vp")
        logging.getLogger("vector_platform.test_logging").warning("calling the API with Authorization: Bearer %s", OPENAI_KEY)
        return dg.MaterializeResult(metadata={"rows": 1})

    talk_job = dg.define_asset_job("talk_job", selection=[talkative])
    job = dg.Definitions(assets=[talkative], jobs=[talk_job]).resolve_job_def("talk_job")
    with dg.instance_for_test(overrides={"python_logs": product_yaml["python_logs"]}) as instance:
        result = job.execute_in_process(instance=instance, partition_key="papers")
        messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("someone:***@db.internal" in m for m in messages)
    assert any("Bearer ***" in m for m in messages)  # captured from the module logger
    assert not any(secret in m for m in messages for secret in SECRETS)
    printed = capfd.readouterr().err
    lines = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    mine = [line for line in lines if "db.internal" in line["message"]]
    assert mine and mine[0]["run_id"] == result.run_id and mine[0]["collection"] == "papers" and mine[0]["step"] == "talkative"
    assert mine[0]["job"] == "talk_job" and mine[0]["level"] == "INFO"
    captured = [line for line in lines if "Bearer" in line["message"]]  # our module's logger, through the run
    assert captured and captured[0]["level"] == "WARNING" and captured[0]["collection"] == "papers"
    assert all(line["run_id"] == result.run_id for line in lines)  # INFO and up: Dagster's DEBUG events stay out
    assert not any(secret in printed for secret in SECRETS)


# ---------------------------------------------------------------- end to end


def _password_role(pg_server) -> str:
    """A login role that must give its password (scram-sha-256 on the socket), and its DSN."""
    role = f"vp_secret_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(sql.Identifier(role), sql.Literal(PASSWORD)))
        hba = Path(admin.execute("SHOW hba_file").fetchone()[0])
        hba.write_text(f"local all {role} scram-sha-256\n" + hba.read_text())
        admin.execute("SELECT pg_reload_conf()")
    socket_dir = pg_server.get_postmaster_info().socket_dir
    dsn = f"postgresql://{role}:{PASSWORD}@/vp_test?host={socket_dir}"
    wrong = f"postgresql://{role}:not-the-password@/vp_test?host={socket_dir}"
    deadline = time.time() + 10
    while True:  # the reload is asynchronous
        try:
            psycopg.connect(wrong).close()
        except psycopg.OperationalError as err:
            assert "password authentication failed" in str(err)
            break
        assert time.time() < deadline, "pg_hba.conf reload did not take"
        time.sleep(0.2)
    psycopg.connect(dsn).close()
    return dsn


def _request(url: str, body: dict | None = None, headers: dict | None = None) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body else None, headers=headers or {},
                                     method="POST" if body else "GET")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_no_password_or_api_key_anywhere_after_ingest_search_and_http(pg_server, pg_dsn, tmp_path, unique_name, monkeypatch):
    """A DSN with a real password, an OpenAI-compatible model with a key, and an API key: after
    an ingest (JSON logs at DEBUG, and plain text), searches from the CLI and over HTTP, none of
    the secrets is in any output, in the Dagster instance (event logs, metadata, check results,
    run configs) or in any file it wrote."""
    dsn = _password_role(pg_server)
    embeddings = FaultServer(space="random").start()
    home, env = instance_env(pg_server, pg_dsn, tmp_path)  # the product's dagster.yaml (python_logs too)
    env.update(VP_PG_DSN=dsn, OPENAI_API_KEY=OPENAI_KEY, VP_API_KEY=API_KEY, VP_LOG_FORMAT="json", VP_LOG_LEVEL="DEBUG")
    name = unique_name
    docs = [{"id": f"d{i}", "text": f"note {i} on topic {i % 3}"} for i in range(20)]
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    with source.open("a") as f:
        f.write("{broken\n")
    outputs: list[str] = []

    def run(*args, check=True, **extra) -> subprocess.CompletedProcess:
        done = subprocess.run(cli(*args), env={**env, **extra}, capture_output=True, text=True, timeout=600)
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0 or not check, done.stdout + done.stderr[-3000:]
        return done

    try:
        run("models", "add", "api_small", "--provider", "openai", "--model-name", "fake-small", "--dims", "384",
            "--base-url", embeddings.base_url)
        run("collections", "add", name, "--source", str(source), "--model", "api_small")
        ingest = run("ingest", name, "--quiet")
        write_jsonl(tmp_path / "docs.jsonl", docs + [{"id": "extra", "text": "one more note"}])
        run("ingest", name, "--quiet", VP_LOG_FORMAT="text", VP_LOG_LEVEL="INFO")
        run("search", "note on topic", "--collection", name, "--json")
        with Server(env, "serve") as server:
            body = {"query": "topic 1", "collections": [name], "k": 3}
            assert _request(f"{server.base}/search", body, {"X-API-Key": API_KEY}) == 200
            assert _request(f"{server.base}/search", body, {"Authorization": f"Bearer {API_KEY}"}) == 200
            assert _request(f"{server.base}/search", body, {"X-API-Key": "wrong"}) == 401
            assert _request(f"{server.base}/metrics", headers={"X-API-Key": API_KEY}) == 200
            assert _request(f"{server.base}/search", {"collections": [name], "vector": [1.0]}, {"X-API-Key": API_KEY}) == 400
        outputs.append(server.output)
        # An API gateway that quotes the key it refuses: the step fails, saying so without the key.
        embeddings.faults.echo_key_marker = "ECHO_KEY"
        write_jsonl(tmp_path / "docs.jsonl", docs + [{"id": "echo", "text": "ECHO_KEY please"}])
        refused = run("ingest", name, "--quiet", check=False)
        assert refused.returncode == 1 and "Incorrect API key provided: ***" in refused.stderr
    finally:
        embeddings.stop()

    # The ingest's JSON lines say which run, collection and model they are about.
    lines = [json.loads(line) for line in ingest.stderr.splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    embedding_lines = [line for line in lines if line.get("step") == "embeddings"]
    assert embedding_lines and {(line["collection"], line["model"]) for line in embedding_lines} == {(name, "api_small")}
    assert all(len(line.get("run_id", "")) == 36 for line in embedding_lines)

    # The server's lines carry the request: its id, route, and the collections it searched.
    served = [json.loads(line) for line in server.output.splitlines() if line.startswith("{")]
    in_search = [line for line in served if line.get("route") == "/search" and line.get("collection") == name]
    assert in_search and all(len(line["request_id"]) == 12 for line in in_search)

    for text in outputs:
        for secret in SECRETS:
            assert secret not in text
    for variable in ("VP_DAGSTER_PG_URL", "VP_DAGSTER_ARTIFACTS"):  # what the instance's dagster.yaml reads
        monkeypatch.setenv(variable, env[variable])
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        runs = instance.get_runs()
        assert len(runs) >= 8  # two ingests of three runs each, then one that fails at its embeddings
        materialized, refusal_recorded = 0, False
        for dagster_run in runs:
            entries = instance.all_logs(dagster_run.run_id)
            materialized += sum(e.dagster_event is not None and e.dagster_event.is_step_materialization for e in entries)
            dumped = [dg.serialize_value(dagster_run), dg.serialize_value(instance.get_job_snapshot(dagster_run.job_snapshot_id))]
            dumped += [dg.serialize_value(e) for e in entries]  # messages, metadata, check results, errors
            refusal_recorded |= any("Incorrect API key provided: ***" in text for text in dumped)
            for text in dumped:
                for secret in SECRETS:
                    assert secret not in text, (dagster_run.job_name, secret[:6])
        assert materialized >= 12 and refusal_recorded  # the failed step's error is in the event log, masked
    finally:
        instance.dispose()
    for folder in (home, tmp_path / "artifacts", tmp_path / "vp"):
        for path in Path(folder).rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not any(secret.encode() in data for secret in SECRETS), path
    with psycopg.connect(pg_dsn) as conn:  # dead letters keep errors for people to read: masked too
        errors = [r[0] for r in conn.execute("SELECT error FROM vector_platform.dead_letters WHERE collection = %s", (name,))]
    assert errors and not any(secret in error for error in errors for secret in SECRETS)
