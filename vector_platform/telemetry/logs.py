"""Logs: secrets masked whatever the format, and one JSON object per line when asked.

`VP_LOG_FORMAT=json` makes the CLI, `serve`, `metrics` and Dagster runs (`RunLogHandler`, named
in dagster.yaml) write each record as one JSON object on stderr: `time` (UTC, ISO 8601), `level`, `logger`, `message`, and what is
known of where it came from: `run_id`, `job`, `step`, `collection`, `model` (from the run's
Dagster metadata and partition tags, or from `log_context`), `command` (CLI), `request_id`
and `route` (HTTP), `exception` (a traceback, masked too). `VP_LOG_LEVEL` sets the threshold
(default INFO for JSON; the text format keeps Python's default of warnings only unless it
is set). `VP_LOG_FORMAT=text` (the default) changes nothing else.

Masking happens where records are made (a log record factory), so it covers every handler
in the process: ours, Dagster's event log (what the UI shows of a run), and third-party
ones. It replaces with `***`:
- the password of a URL (`postgresql://user:***@host/db`) and of `password=...` key/value
  connection strings;
- the value of `Authorization` (Bearer, Basic) and `X-API-Key` headers and of `api_key=`,
  `token=`, `secret=` pairs;
- the values of secret-bearing environment variables wherever they appear: OPENAI_API_KEY,
  VP_API_KEY, each key of VP_API_KEYS, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, PGPASSWORD, any *_API_KEY, *_TOKEN,
  *_SECRET, *_PASSWORD, and the password inside VP_PG_DSN; plus any value given to
  `register_secret` (the database layer registers every DSN's password). Values shorter than
  8 characters are not hunted down as bare words (masking them would garble ordinary text);
  the patterns above still mask them in their usual places.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import sys
from contextvars import ContextVar
from typing import Any, Iterator

MASK = "***"
MIN_SECRET_LENGTH = 8
FORMATS = ("text", "json")
CONTEXT_FIELDS = ("run_id", "job", "step", "collection", "model", "command", "request_id", "route")

_context: ContextVar[dict[str, str]] = ContextVar("vector_platform_log_context", default={})


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Fields every record logged inside the block carries (None values are left out)."""
    token = _context.set({**_context.get(), **{k: str(v) for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> dict[str, str]:
    return dict(_context.get())


# ---------------------------------------------------------------- masking

_SECRET_KEYS = (r"password|passwd|pwd|x-api-key|api[_-]?key|apikey|secret(?:[_-]?access)?[_-]?key|secret|"
                r"access[_-]?token|session[_-]?token|token")
_PATTERNS = [
    # scheme://user:PASSWORD@host (the user stays: it says who connected)
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#@\s]*:)[^@\s/]+(?=@)"), r"\1" + MASK),
    # Authorization: Bearer X / 'authorization': 'Basic X'
    (re.compile(r"(?i)(\bauthorization[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token)\s+)?)[^\s\"',;}]+"), r"\1" + MASK),
    # password='X Y', api_key: "X", then the same unquoted: password=X, x-api-key: X, token=X ...
    # (libpq key/value strings, headers, dict and JSON reprs)
    (re.compile(rf"(?i)(\b(?:{_SECRET_KEYS})[\"']?\s*[:=]\s*)(['\"])(?:\\.|(?!\2).)*\2"), r"\1\2" + MASK + r"\2"),
    (re.compile(rf"(?i)(\b(?:{_SECRET_KEYS})[\"']?\s*[:=]\s*)(?![\"']|\*\*\*)[^\s\"',;&}}]+"), r"\1" + MASK),
]
_SECRET_ENV_NAMES = ("OPENAI_API_KEY", "VP_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PGPASSWORD")
_SECRET_ENV_SUFFIXES = ("_API_KEY", "_TOKEN", "_SECRET", "_SECRET_KEY", "_PASSWORD")
_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """Mask this value wherever it appears in a log message from now on."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        _registered.add(value)


def dsn_password(dsn: str | None) -> str | None:
    """The password inside a libpq connection string (URL or key/value), if any."""
    if not dsn:
        return None
    try:
        from psycopg.conninfo import conninfo_to_dict

        return conninfo_to_dict(dsn).get("password") or None
    except Exception:  # noqa: BLE001 - not a connection string: nothing to find
        return None


def _secret_values() -> list[str]:
    """Known secret values, longest first (so one inside another is masked whole)."""
    values = set(_registered)
    for name, value in os.environ.items():
        if value and (name in _SECRET_ENV_NAMES or name.endswith(_SECRET_ENV_SUFFIXES)):
            values.add(value)
    values.add(dsn_password(os.environ.get("VP_PG_DSN")) or "")
    for entry in os.environ.get("VP_API_KEYS", "").split(","):  # name:key pairs: each key is a secret
        values.add(entry.partition(":")[2].strip())
    return sorted((v for v in values if len(v) >= MIN_SECRET_LENGTH), key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with every secret this module knows of replaced by `***`."""
    if not text:
        return text
    for value in _secret_values():
        if value in text:
            text = text.replace(value, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a broken format string is logging's own error to report
        return
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, ()
    if record.exc_info and not record.exc_text:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))


_base_factory = None


def install_redaction() -> None:
    """Mask secrets in every log record this process makes from now on (idempotent)."""
    global _base_factory
    if _base_factory is not None:
        return
    _base_factory = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = _base_factory(*args, **kwargs)
        _redact_record(record)
        return record

    logging.setLogRecordFactory(factory)


# ---------------------------------------------------------------- formats

def log_format() -> str:
    fmt = os.environ.get("VP_LOG_FORMAT", "text").strip().lower() or "text"
    if fmt not in FORMATS:
        raise ValueError(f"VP_LOG_FORMAT must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def log_level(default: str = "INFO") -> int:
    name = os.environ.get("VP_LOG_LEVEL", default).strip().upper()
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise ValueError(f"VP_LOG_LEVEL must be a level name such as INFO or WARNING, got {name!r}")
    return level


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What a record says about where it came from: Dagster's run metadata when it went
    through a run's log manager, then whatever `log_context` holds."""
    fields: dict[str, Any] = {}
    meta = getattr(record, "dagster_meta", None)
    if isinstance(meta, dict):
        fields.update(run_id=meta.get("run_id"), job=meta.get("job_name"), step=meta.get("step_key"))
        tags = meta.get("job_tags") or {}
        collection, model = tags.get("dagster/partition/collection"), tags.get("dagster/partition/model")
        partition = tags.get("dagster/partition")
        if collection is None and partition:  # one-dimension runs, or "collection|model"
            collection, _, model = partition.partition("|")
        fields.update(collection=collection, model=model or None)
        event = meta.get("dagster_event")
        if event is not None:
            fields["event"] = getattr(event, "event_type_value", None)
    fields.update(_context.get())
    return {k: v for k, v in fields.items() if v is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, masked."""

    def format(self, record: logging.LogRecord) -> str:
        meta = getattr(record, "dagster_meta", None)
        message = meta.get("orig_message") if isinstance(meta, dict) and meta.get("orig_message") else record.getMessage()
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(str(message)),
            **record_fields(record),
        }
        if record.exc_info or record.exc_text:
            out["exception"] = redact(record.exc_text or self.formatException(record.exc_info))
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time level logger: message`, masked."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def formatter() -> logging.Formatter:
    return JsonFormatter() if log_format() == "json" else TextFormatter()


class RunLogHandler(logging.StreamHandler):
    """Dagster runs' log as JSON lines on stderr when VP_LOG_FORMAT=json (silent otherwise).

    dagster.yaml names it under `python_logs.dagster_handler_config`, so every run of the
    instance gets it, however it was launched (UI, sensor, schedule, CLI): it receives each
    `context.log` message, Dagster's events and the records of the managed Python loggers,
    with the run's metadata (run id, job, step, partition tags)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(JsonFormatter())
        self.setLevel(log_level() if log_format() == "json" else logging.CRITICAL + 1)


_handler: logging.Handler | None = None


def setup() -> str:
    """Logging for a command of ours (the CLI, `serve`, `metrics`): masking always; with
    VP_LOG_FORMAT=json (or VP_LOG_LEVEL set) one handler on the root logger writing to stderr.
    Returns the format in use."""
    global _handler
    install_redaction()
    fmt = log_format()
    if fmt == "text" and "VP_LOG_LEVEL" not in os.environ:
        return fmt  # Python's default: warnings and errors, as plain lines
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(formatter())
    root.addHandler(_handler)
    root.setLevel(log_level())
    logging.captureWarnings(fmt == "json")  # Python warnings as JSON lines too, not bare text on stderr
    return fmt
