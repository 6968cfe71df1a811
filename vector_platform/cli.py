"""`vector-platform`: the command line. Commands that change data run through Dagster."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from vector_platform.names import InvalidName
from vector_platform.telemetry import logs


def _platform():
    from vector_platform.api import Platform

    return Platform()


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, default=str, ensure_ascii=False))


SETTING_FLAGS = {
    "hnsw_m": int,
    "hnsw_ef_construction": int,
    "hnsw_ef_search": int,
    "rerank_factor": int,
    "cold_nprobe": int,
    "chunk_max_tokens": int,
    "chunk_overlap_tokens": int,
    "max_delete_fraction": float,
    "recall_target": float,
    "upgrade_ndcg_margin": float,
    "upgrade_latency_factor": float,
    "upgrade_latency_floor_ms": float,
    "retain_previous_days": float,
}


def _given_settings(args) -> dict[str, Any]:
    """Only the settings the user typed: everything else keeps its current value."""
    return {name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name, None) is not None}


def cmd_collections_add(args) -> int:
    vp = _platform()
    coll = vp.add_collection(args.name, args.source, model=args.model, **_given_settings(args))
    print(f"collection {coll.name}: source {coll.source}, models {', '.join(coll.models)}, tier {coll.tier}")
    return 0


def cmd_collections_set(args) -> int:
    changes = _given_settings(args)
    if not changes and not args.storage:
        print("error: give at least one setting to change (see --help)", file=sys.stderr)
        return 2
    if args.storage:
        if changes:
            print("error: --storage rebuilds the collection through a model upgrade: change other settings apart", file=sys.stderr)
            return 2
        outcome = _platform().set_storage(args.name, args.storage, wait=args.wait, swap=not args.no_swap)
        if outcome is None:
            print(f"{args.name}: storage unchanged ({args.storage})")
            return 0
        return _report_upgrade(outcome)
    before, after = _platform().set_settings(args.name, **changes)
    for name in changes:
        old, new = getattr(before, name), getattr(after, name)
        print(f"{args.name}: {name} {old} -> {new}" if old != new else f"{args.name}: {name} unchanged ({new})")
    if any(getattr(before, f) != getattr(after, f) for f in before.CHUNKING):
        print("chunking changed: the next ingest re-chunks every document (only changed chunk text is embedded again)")
    if (before.hnsw_m, before.hnsw_ef_construction) != (after.hnsw_m, after.hnsw_ef_construction):
        print("HNSW parameters changed: the next ingest rebuilds the index concurrently (the old one serves meanwhile)")
    return 0


def _add_setting_flags(parser) -> None:
    for name, kind in SETTING_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=kind, dest=name)
    parser.add_argument("--ef-search", type=int, dest="hnsw_ef_search", help="alias of --hnsw-ef-search")


def cmd_collections_list(args) -> int:
    from vector_platform import catalog

    vp = _platform()
    with vp.pool().connection() as conn:
        rows = [
            {"name": c.name, "source": c.source, "tier": c.tier, "serving_model": c.serving_model, "models": list(c.models)}
            for c in catalog.list_collections(conn)
        ]
    if args.json:
        _print_json({"collections": rows})
    else:
        for r in rows:
            print(f"{r['name']:<24} {r['tier']:<8} {r['serving_model']:<16} {r['source']}")
    return 0


def _say_layout(vp, name: str) -> None:
    """Which layout row archival will use for the collection's vector tables."""
    from vector_platform import catalog, tables

    with vp.pool().connection() as conn:
        coll = catalog.get_collection(conn, name)
        table = catalog.vector_table_name(conn, name, coll.serving_model)
        exists, partitioned = tables.table_exists(conn, table), tables.is_partitioned(conn, table)
    if not exists:
        print(f"{name}: its vector tables will be partitioned by source month (archival detaches whole months)", file=sys.stderr)
    elif not partitioned:
        print(f"{name}: its vector table already exists unpartitioned: archival deletes rows by key in batches. Tables made "
              "from now on (a model upgrade, or evict then rehydrate) are partitioned by source month", file=sys.stderr)


def cmd_collections_rules(args) -> int:
    from vector_platform.catalog import tiers as tier_sql

    vp = _platform()
    changes: dict[str, Any] = {}
    for flag in ("evict_after_days", "archive_after_days", "archive_rows_older_than_days"):
        value = getattr(args, flag)
        if value is not None:
            changes[flag] = None if value == 0 else value
    if args.rehydrate_on_query is not None:
        changes["rehydrate_on_query"] = args.rehydrate_on_query
    if changes:
        rules = vp.set_rules(args.name, **changes)
    else:
        with vp.pool().connection() as conn:
            states = tier_sql.tier_states(conn, [args.name])
        if not states:
            raise KeyError(f"unknown collection {args.name!r}")
        rules = states[0].rules
    if changes.get("archive_rows_older_than_days"):
        _say_layout(vp, args.name)
    if args.json:
        _print_json({"collection": args.name, "rules": rules.to_json()})
    else:
        print(
            f"{args.name}: evict after {rules.evict_after_days or '-'} idle days, archive after "
            f"{rules.archive_after_days or '-'} cold days, rehydrate on query: {'yes' if rules.rehydrate_on_query else 'no'}, "
            f"archive rows older than {rules.archive_rows_older_than_days or '-'} days"
        )
    return 0


def cmd_tier(args) -> int:
    vp = _platform()
    outcome = vp.tier(args.name, args.tier, wait=args.wait)
    if isinstance(outcome, str):
        print(f"run {outcome} submitted ({args.name} -> {args.tier}); follow it in the Dagster UI, or run again with --wait")
        return 0
    if not args.wait:
        print(f"no dagster-daemon serves the instance: the move ran here (run {outcome.run_id})", file=sys.stderr)
    return _report_runs([outcome])


def cmd_serve(args) -> int:
    from vector_platform.http import serve

    return serve(host=args.host, port=args.port)


def cmd_metrics(args) -> int:
    from vector_platform.http import serve_metrics

    return serve_metrics(host=args.host, port=args.port)


def cmd_ingest(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vector_platform import progress as progress_hooks

    vp = _platform()
    vp.collection(args.name)  # clear error for an unknown collection before anything starts
    with Progress(
        TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        transient=False, disable=not sys.stderr.isatty() or args.quiet,
    ) as bars:
        tasks: dict[str, Any] = {}

        def show(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        def tell(message: str) -> None:
            print(message, file=sys.stderr, flush=True)

        progress_hooks.listeners.append(show)
        progress_hooks.notice_listeners.append(tell)
        try:
            runs = vp.ingest(args.name, allow_deletes=args.allow_deletes)
        finally:
            progress_hooks.listeners.remove(show)
            progress_hooks.notice_listeners.remove(tell)
    return _report_runs(runs)


def _report_runs(runs) -> int:
    failed = False
    for run in runs:
        state = "ok" if run.success else "FAILED"
        print(f"{run.job} [{run.partition}] {state} (run {run.run_id[:8]}, {run.mode.replace('_', '-')})")
        for asset, meta in run.metadata.items():
            shown = {k: v for k, v in meta.items() if not k.startswith("dagster/") and not isinstance(v, (dict, list))
                     and not (isinstance(v, str) and "\n" in v)}  # tables and charts are for the UI
            print(f"  {asset}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
        for check, passed in run.checks.items():
            print(f"  check {check}: {'passed' if passed else 'FAILED'}")
        if not run.success:
            failed = True
            print(f"  error: {logs.redact(str(run.error))}", file=sys.stderr)
    return 1 if failed else 0


def _print_result(result, as_json: bool) -> None:
    if as_json:
        _print_json(result.as_json())
        return
    print(f"query: {result.query}")
    for i, hit in enumerate(result.hits, 1):
        snippet = " ".join(hit.text.split())[:160]
        print(f"{i:>2}. {hit.score:.4f} [{hit.collection}/{hit.source_tier}] {hit.doc_id}: {snippet}")
    for warning in result.warnings:
        print(f"warning: {warning}")


def cmd_search(args) -> int:
    from vector_platform import audit

    queries = []
    if args.queries:
        queries = [line.strip() for line in Path(args.queries).read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.query:
        queries.insert(0, args.query)
    if not queries:
        print("error: give a QUERY or --queries FILE", file=sys.stderr)
        return 2
    filters = None
    if args.filters:
        try:
            filters = json.loads(args.filters)
        except json.JSONDecodeError as err:
            raise ValueError(f"--filters is not JSON ({err})") from None
        except RecursionError:
            raise ValueError("--filters is nested too deeply") from None
    vp = _platform()
    for query in queries:
        started, result, error = time.perf_counter(), None, None
        try:
            result = vp.search(query, args.collection, k=args.k, exact=args.exact, filters=filters,
                               include_archive=args.include_archive, since=args.since, until=args.until,
                               consistent=args.consistent)
        except Exception as err:
            error = str(err)[:500]
            raise
        finally:
            if audit.enabled():
                audit.record(vp.pool(), principal=audit.cli_principal(), channel="cli", collections=args.collection,
                             query_text=query, k=args.k, results=audit.hits_of(result) if result else [],
                             latency_ms=(time.perf_counter() - started) * 1000, error=error)
        _print_result(result, args.json)
    return 0


def _report_checks(run, show: dict[str, list[str]]) -> int:
    """_report_runs, then chosen check metadata (a Markdown list or table, printed as it is);
    exit code 1 when a check failed too, so a cron job or a monitoring script sees it."""
    code = _report_runs([run])
    for check, keys in show.items():
        for key in keys:
            value = run.check_metadata.get(check, {}).get(key)
            if value is not None:
                print(f"  {check} {key}:\n" + "\n".join(f"    {line}" for line in str(value).splitlines()))
    return code or (0 if all(run.checks.values()) else 1)


def cmd_maintenance(args) -> int:
    return _report_checks(_platform().maintain(), {"vector_tables_healthy": ["problems"]})


def cmd_recall(args) -> int:
    return _report_checks(_platform().check_recall(args.name),
                          {"index_recall_meets_target": ["recall_vs_ef_search", "recall_over_time"]})


def cmd_audit(args) -> int:
    from vector_platform import audit

    with _platform().pool().connection() as conn:
        rows = audit.entries(conn, since=args.since, collection=args.collection, principal=args.principal, limit=args.limit)
    for row in rows:
        if args.json:
            print(audit.as_json(row))
        else:
            ids = ", ".join(f"{h['collection']}/{h['doc_id']}" for h in row["results"][:5])
            more = f" (+{len(row['results']) - 5})" if len(row["results"]) > 5 else ""
            outcome = f"ERROR {row['error']}" if row["error"] else f"{len(row['results'])} hits: {ids}{more}"
            print(f"{row['at']:%Y-%m-%d %H:%M:%S%z}  {row['principal']} ({row['channel']}{', ' + row['client'] if row['client'] else ''})"
                  f"  {','.join(row['collections'])}  {row['latency_ms']:.1f} ms  {row['query_text']!r}  {outcome}")
    if not rows and not args.json:
        print("no audit rows" + ("" if audit.enabled() else " (auditing is off: set VP_AUDIT=1)"))
    return 0


def _timestamp(text: str) -> dt.datetime:
    """An ISO date or date-time; UTC unless it says otherwise."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date or time (e.g. 2024-07-01)") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def cmd_archive_rows(args) -> int:
    return _report_runs([_platform().archive_rows(args.name)])


def cmd_get(args) -> int:
    doc = _platform().get(args.name, args.doc_id)
    if doc is None:
        print(f"{args.name}: no document {args.doc_id!r} (not in Postgres, not in the row archive)", file=sys.stderr)
        return 1
    if args.json:
        _print_json(doc)
        return 0
    where = doc["source_tier"]
    if where == "archive":
        where += f" ({doc['archive']['uri']}, row group {doc['archive']['row_group']})"
    print(f"{doc['doc_id']}  [{where}]  source_ts={doc['source_ts'] or '-'}")
    if doc.get("title"):
        print(doc["title"])
    print(doc["body"])
    return 0


def cmd_status(args) -> int:
    status = _platform().status()
    if args.json:
        _print_json(status)
        return 0
    database = status["database"]
    if database.get("embedded"):
        where = f"pid {database['pid']}, socket {database['socket_dir']}" if database["running"] else "not running"
        print(f"database: embedded PostgreSQL ({where}), data {database['data_dir']}")
    else:
        print("database: VP_PG_DSN")
    for c in status["collections"]:
        print(
            f"{c['name']:<20} tier={c['tier']:<8} docs={c['documents']:<7} chunks={c['chunks']:<7} "
            f"vectors={c['vectors']:<7} dead_letters={c['dead_letters']:<4} pg={c['bytes_postgres'] / 2**20:.1f} MiB "
            f"store={c['bytes_object_store'] / 2**20:.1f} MiB last_queried={c['last_queried_at'] or '-'}"
        )
        for model_key, t in c["tables"].items():
            recall = t.get("recall")
            print(
                f"  {model_key}{' (serving)' if model_key == c['serving_model'] else ''}: storage {t['storage_type']}, "
                + (f"{t['table_bytes_per_vector']:,.0f} B/vector in the table, " if t.get("table_bytes_per_vector") else "")
                + (f"{t['index_bytes_per_vector']:,.0f} B/vector in the HNSW index, " if t.get("index_bytes_per_vector") else "no index, ")
                + (f"recall@10 {recall['recall']:.3f} at ef_search {recall['ef_search']} ({recall['measured_at'][:16]})"
                   if recall and recall.get("recall") is not None else "recall not measured yet")
            )
        for snap in c["snapshots"]:
            if snap["serving"]:
                print(
                    f"  snapshot {snap['id']} of {snap['model']} (cold search reads it): {snap['rows']:,} rows, "
                    f"{snap['bytes'] / 2**20:,.1f} MiB, "
                    + (f"IVF layout, {snap['lists']:,} lists, a query reads the nearest {snap['nprobe']:,} "
                       + ("(cold_nprobe)" if snap["nprobe_setting"] else "(the default; setting cold_nprobe)")
                       if snap["layout"] == "ivf" else "every row scored (flat layout)")
                )
        serving = c["tables"].get(c["serving_model"])
        if serving and serving.get("partitions") is not None:
            print(f"  vectors: partitioned by source month ({serving['partitions']} partitions)")
        archive = c["archive"]
        for pending in archive.get("partitions_pending", []):
            print(f"  partition {pending['table']} ({pending['month']}) is {pending['state']}, not yet checked and dropped"
                  + (f": {pending['error']}" if pending["error"] else "") + " (the next archive-rows finishes it)")
        if archive["documents"] or archive["jobs"]:
            job = archive["jobs"][0] if archive["jobs"] else None
            print(
                f"  row archive: {archive['documents']} documents, {archive['vector_rows']} vectors, "
                f"{archive['bytes'] / 2**20:.1f} MiB in {archive['files']} files"
                + (f"; last job {job['id']} {job['status']} (cutoff {job['cutoff'][:10]})" if job else "")
                + (f": {job['error']}" if job and job["error"] else "")
            )
        cost = c["cost"]
        print(
            f"  storage: {cost['postgres_gb']:.3f} GB in Postgres, {cost['object_store_gb']:.3f} GB on the object store, "
            f"about ${cost['usd_per_month']:.2f}/month"
        )
        if c["tier_events"]:
            e = c["tier_events"][0]
            print(f"{'':<20} last move: {e['from']} -> {e['to']} ({e['reason']}) at {e['at']}, {e['rows']} rows, {e['seconds']:.1f} s")
    return 0


def cmd_dead_letters(args) -> int:
    from vector_platform import catalog

    vp = _platform()
    with vp.pool().connection() as conn:
        rows = catalog.open_dead_letters(conn, args.collection)
    if args.json:
        _print_json({"dead_letters": rows})
    else:
        for r in rows:
            print(f"{r['collection']}/{r['model_key'] or '-'} {r['stage']} {r['ref']} (attempts {r['attempts']}): {r['error']}")
    return 0


def cmd_dead_letters_replay(args) -> int:
    vp = _platform()
    runs = vp.replay_dead_letters(args.name)
    if not runs:
        print(f"{args.name}: no open embedding dead letters")
        return 0
    return _report_runs(runs)


def cmd_db(args) -> int:
    from vector_platform import db
    from vector_platform.settings import vp_home

    home = vp_home()
    if args.action == "reader-role":
        return _reader_role(args)
    if os.environ.get("VP_PG_DSN"):
        print("VP_PG_DSN is set: the platform uses that server, not an embedded one", file=sys.stderr)
    if args.action == "start":
        db.embedded_server(home)
        status = db.embedded_status(home)
        print(f"embedded PostgreSQL running: pid {status['pid']}, socket {status['socket_dir']}, data {status['data_dir']}")
    elif args.action == "stop":
        stopped = db.stop_embedded(home)
        print("embedded PostgreSQL stopped" if stopped else f"embedded PostgreSQL was not running ({home / 'pg'})")
    else:
        status = db.embedded_status(home)
        if args.json:
            _print_json(status)
        elif status["running"]:
            print(f"running: pid {status['pid']}, socket {status['socket_dir']}, data {status['data_dir']}")
        else:
            print(f"not running (data {status['data_dir']}{'' if status['initialised'] else ', not created yet'})")
    return 0


def _reader_role(args) -> int:
    """`db reader-role`: the read-only role search runs as; says how to point VP_PG_READ_DSN at
    it. The password is read from the environment and never printed."""
    from vector_platform import db

    vp = _platform()
    granted = vp.create_reader_role(args.name, args.password_env)
    if args.json:
        _print_json(granted)
        return 0
    role = granted["role"]
    print(f"role {role} {'created' if granted['created'] else 'up to date'}: "
          + (f"LOGIN, password from ${args.password_env}" if granted["login"] else
             f"NOLOGIN (no ${args.password_env}): grant it to a login role, GRANT {role} TO <user>"))
    print(f"  SELECT on {', '.join('vector_platform.' + t for t in granted['catalog_tables'])}")
    print(f"  SELECT on every table and view in vp_vectors and vp_serving, and on those {granted['owner']} creates later")
    print("  nothing else: no INSERT, UPDATE, DELETE, TRUNCATE, CREATE or DROP")
    template = db.reader_dsn(vp.postgres.resolved_dsn(), role)
    print(f"search through it: VP_PG_READ_DSN='{template}' plus its password (in the DSN or PGPASSWORD)")
    return 0


def cmd_models_add(args) -> int:
    from vector_platform.models import ModelSpec

    options = {}
    for item in args.option or []:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    if args.base_url:
        options["base_url"] = args.base_url
    if args.dimensions_param:
        options["dimensions"] = args.dimensions_param
    spec = ModelSpec(
        key=args.key, provider=args.provider, model_name=args.model_name, dims=args.dims,
        distance=args.distance, storage_type=args.storage_type, max_tokens=args.max_tokens, options=options,
    )
    _platform().add_model(spec)
    print(f"model {spec.key}: {spec.provider} {spec.model_name}, {spec.dims} d, {spec.distance}, {spec.storage_type}")
    return 0


def cmd_models_list(args) -> int:
    from vector_platform import catalog

    vp = _platform()
    with vp.pool().connection() as conn:
        specs = [catalog.get_model(conn, key) for key in catalog.list_model_keys(conn)]
    if args.json:
        _print_json({"models": [{**s.to_row(), "fingerprint": s.fingerprint} for s in specs]})
    else:
        for s in specs:
            print(f"{s.key:<20} {s.provider:<7} {s.dims:>5} d {s.distance:<13} {s.storage_type:<7} {s.fingerprint}  {s.model_name}")
    return 0


def _report_upgrade(outcome) -> int:
    if outcome.backfill_id:
        state = outcome.status or "submitted (a dagster-daemon executes it; follow it on the UI's backfills page)"
        print(f"backfill {outcome.backfill_id}: {state}")
    failed = _report_runs(outcome.runs) if outcome.runs else 0
    for name, meta in outcome.swaps.items():
        if meta.get("kind") == "unchanged":
            print(f"{name}: already serving {outcome.to}")
        else:
            print(f"{name}: now serving {outcome.to} (was {meta.get('from_model')}; previous kept until {meta.get('previous_retained_until')})")
    for name, reason in outcome.refused.items():
        print(f"{name}: NOT swapped: {reason}")
    for name, reason in outcome.not_rehydrated.items():
        print(f"{name}: swapped, still cold: the rehydrate failed: {reason} (vector-platform tier {name} active)")
    if outcome.status and outcome.status not in ("COMPLETED", "COMPLETED_SUCCESS"):
        print(f"re-run only what failed: vector-platform models retry {outcome.backfill_id} --wait")
        failed = 1
    return 1 if failed or outcome.refused or outcome.not_rehydrated else 0


def cmd_models_upgrade(args) -> int:
    if args.rehydrate and (args.no_swap or not args.wait):
        raise ValueError("--rehydrate needs --wait (and a swap): a cold collection comes back to active after its swap")
    outcome = _platform().upgrade(args.collections, args.to, wait=args.wait, swap=not args.no_swap, rehydrate=args.rehydrate)
    return _report_upgrade(outcome)


def cmd_models_retry(args) -> int:
    outcome = _platform().retry_upgrade(args.backfill_id, wait=args.wait, swap=not args.no_swap)
    return _report_upgrade(outcome)


def cmd_models_swap(args) -> int:
    run = _platform().swap(args.name, args.to)
    meta = run.metadata.get("serving_view", {})
    print(f"{args.name}: serving {meta.get('to_model')} (was {meta.get('from_model')}, gate {meta.get('gate_id')}); "
          f"previous kept until {meta.get('previous_retained_until')}")
    return 0


def cmd_models_rollback(args) -> int:
    run = _platform().rollback(args.name)
    meta = run.metadata.get("serving_view", {})
    print(f"{args.name}: rolled back to {meta.get('to_model')} (from {meta.get('from_model')}); "
          f"{meta.get('from_model')} kept until {meta.get('previous_retained_until')}")
    return 0


def cmd_models_abandon(args) -> int:
    _platform().abandon_upgrade(args.collection, args.model)
    print(f"{args.collection}: gave up {args.model} (its shadow table dropped, no longer written; the attachment is history)")
    return 0


def cmd_models_retire(args) -> int:
    retired = _platform().retire_previous_models()
    for collection, model in retired:
        print(f"{collection}: retired {model} (table dropped; snapshots kept)")
    if not retired:
        print("nothing to retire: no previous model is past its retention")
    return 0


def cmd_collections_qrels(args) -> int:
    queries, judgements = _platform().set_qrels(args.name, args.file, args.queries)
    print(f"{args.name}: {queries} labelled queries, {judgements} judgements (used by the upgrade gate's nDCG@10)")
    return 0


def _backup_line(b) -> str:
    rows = ", ".join(f"{m} {n}" for m, n in b.rows.items()) or "no vectors"
    archive = b.row_archive
    left_out = f"; row archive NOT included ({archive['documents']} documents)" if archive["documents"] or archive["files"] else ""
    return (f"{b.created_at:%Y-%m-%d %H:%M:%S}  {b.id}  {b.tier:<8} vectors: {rows}; {b.documents} documents, "
            f"{b.bytes / 2**20:.2f} MiB in {b.files} files{left_out}  {b.uri}")


def cmd_backup(args) -> int:
    info = _platform().backup(args.name, to=args.to)
    if args.json:
        _print_json(info.as_json())
    else:
        print(f"{args.name}: backup written and verified")
        print(_backup_line(info))
    return 0


def cmd_backups(args) -> int:
    found = _platform().backups(args.name, args.location)
    if args.json:
        _print_json({"collection": args.name, "backups": [b.as_json() for b in found]})
        return 0
    if not found:
        print(f"{args.name}: no complete backup at {args.location or 'the default location ($VP_BACKUP_URL or $VP_HOME/backups)'}")
    for b in found:
        print(_backup_line(b))
    return 0


def cmd_restore(args) -> int:
    report = _platform().restore(args.name, args.source, as_name=args.as_name)
    if args.json:
        _print_json(report.as_json())
        return 0
    vectors = ", ".join(f"{m} {n}" for m, n in report.vectors.items()) or "no vectors"
    print(f"{report.collection}: restored from backup {report.backup_id} ({report.tier}; {report.documents} documents, "
          f"{report.chunks} chunks, vectors: {vectors}; nothing embedded)")
    if report.models_registered:
        print(f"  models registered: {', '.join(report.models_registered)}")
    for warning in report.warnings:
        print(f"  warning: {warning}")
    return 0


def cmd_collections_drop(args) -> int:
    report = _platform().drop_collection(args.name, force=args.force, backups=args.backups)
    if report.finished_earlier_drop:
        print(f"{args.name}: finished an earlier drop ({report.files_deleted} files left on the object store deleted)")
    elif report.forced:
        print(f"{args.name}: dropped WITHOUT a backup check (--force); {report.files_deleted} object-store files deleted")
    else:
        print(f"{args.name}: dropped; backup {report.backup_id} holds its last state ({report.backup_uri}); "
              f"{report.files_deleted} object-store files deleted")
    return 0


def cmd_demo(args) -> int:
    from vector_platform.demo import run_demo

    return run_demo(limit=args.limit)


def cmd_dev(args) -> int:
    """`dagster dev` on 127.0.0.1 with instance storage in the embedded Postgres."""
    from vector_platform.api import dagster_instance

    dagster_instance().dispose()  # writes dagster.yaml into DAGSTER_HOME, sets the storage env
    repo = Path(__file__).resolve().parent.parent
    workspace = repo / "workspace.yaml"
    dagster = Path(sys.executable).parent / "dagster"
    command = [str(dagster) if dagster.exists() else "dagster", "dev", "-h", args.host, "-p", str(args.port)]
    command += ["-w", str(workspace)] if workspace.exists() else ["-m", "vector_platform.definitions"]
    if logs.log_format() == "json":  # the webserver's and daemon's own lines too (runs: dagster.yaml)
        command += ["--log-format", "json"]
    print(f"DAGSTER_HOME={os.environ['DAGSTER_HOME']}; UI on http://{args.host}:{args.port}", file=sys.stderr)
    os.execvp("env", ["env", "--default-signal=INT,TERM", *command])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vector-platform", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    coll = sub.add_parser("collections", help="declare and list collections").add_subparsers(dest="action", required=True)
    add = coll.add_parser(
        "add", help="declare a collection (folder or JSONL source); on an existing one, change only what is given"
    )
    add.add_argument("name")
    add.add_argument("--source", help="required for a new collection")
    add.add_argument("--model", help="model key (default minilm_l6_v2 for a new collection; attaches it to an existing one)")
    _add_setting_flags(add)
    add.set_defaults(func=cmd_collections_add)
    cset = coll.add_parser("set", help="change some settings of a collection")
    cset.add_argument("name")
    _add_setting_flags(cset)
    cset.add_argument("--storage", choices=["vector", "halfvec", "binary"],
                      help="store the vectors another way (binary: an index of signs, re-ranked at full precision): "
                      "a model upgrade to `<model>_<storage>` (shadow table from the embedding cache, gate, swap)")
    cset.add_argument("--wait", action="store_true", help="with --storage: wait for the backfill, then swap")
    cset.add_argument("--no-swap", action="store_true", help="with --storage --wait: build and gate, keep serving as before")
    cset.set_defaults(func=cmd_collections_set)
    rules = coll.add_parser("rules", help="show or change a collection's tier rules (enforced by tiering_sensor)")
    rules.add_argument("name")
    rules.add_argument("--evict-after-days", type=float, help="evict after N days without queries (0: off)")
    rules.add_argument("--archive-after-days", type=float, help="archive after N days cold (0: off)")
    rules.add_argument("--archive-rows-older-than-days", type=float,
                       help="move documents whose source timestamp is older than N days to the row archive (0: off)")
    rules.add_argument("--rehydrate-on-query", action=argparse.BooleanOptionalAction, default=None,
                       help="rehydrate a cold collection when it is queried (answered cold meanwhile)")
    rules.add_argument("--json", action="store_true")
    rules.set_defaults(func=cmd_collections_rules)
    qrels = coll.add_parser("qrels", help="load labelled queries (BEIR qrels) for the upgrade gate's nDCG@10")
    qrels.add_argument("name")
    qrels.add_argument("file", help="a qrels TSV (query-id, corpus-id, score) or a BEIR dataset folder")
    qrels.add_argument("--queries", help="queries.jsonl (default: beside the qrels file, or one folder up)")
    qrels.set_defaults(func=cmd_collections_qrels)
    lst = coll.add_parser("list", help="list collections")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_collections_list)

    drop = coll.add_parser("drop", help="drop a collection: catalog rows, vector tables, its object-store files "
                           "(refused unless a verified backup holds its current state)")
    drop.add_argument("name")
    drop.add_argument("--backups", metavar="URI", help="where its backups are (default $VP_BACKUP_URL or file://$VP_HOME/backups)")
    drop.add_argument("--force", action="store_true", help="drop without a backup of its current state (its data is lost)")
    drop.set_defaults(func=cmd_collections_drop)

    backup = sub.add_parser("backup", help="write a verified backup of a collection to a second object-store location")
    backup.add_argument("name")
    backup.add_argument("--to", metavar="URI", help="file:///path or s3://bucket/prefix (default $VP_BACKUP_URL or "
                        "file://$VP_HOME/backups); never the primary object store")
    backup.add_argument("--json", action="store_true")
    backup.set_defaults(func=cmd_backup)
    backups = sub.add_parser("backups", help="list a collection's complete backups, newest first")
    backups.add_argument("name")
    backups.add_argument("--from", dest="location", metavar="URI", help="the backup location (default as for backup)")
    backups.add_argument("--json", action="store_true")
    backups.set_defaults(func=cmd_backups)
    restore = sub.add_parser("restore", help="restore a collection from a backup (checksums verified first; nothing re-embedded)")
    restore.add_argument("name", help="the backed-up collection's name")
    restore.add_argument("--from", dest="source", metavar="URI",
                         help="a backup's folder, or a backup location (its newest backup of NAME; default as for backup)")
    restore.add_argument("--as", dest="as_name", metavar="NEW", help="restore under another name (beside the original)")
    restore.add_argument("--json", action="store_true")
    restore.set_defaults(func=cmd_restore)

    ingest = sub.add_parser("ingest", help="materialize a collection's assets through Dagster")
    ingest.add_argument("name")
    ingest.add_argument("--quiet", action="store_true", help="no progress bars")
    ingest.add_argument(
        "--allow-deletes", action="store_true",
        help="apply the source even if it reads as empty or deletes more than max_delete_fraction of the documents",
    )
    ingest.set_defaults(func=cmd_ingest)

    search = sub.add_parser("search", help="search one or more collections")
    search.add_argument("query", nargs="?")
    search.add_argument("--collection", action="append", required=True)
    search.add_argument("-k", type=int, default=10, help="hits to return, 1..1000")
    search.add_argument("--exact", action="store_true", help="exact search, bypassing the HNSW index")
    search.add_argument("--queries", help="a file with one query per line (the model loads once)")
    search.add_argument("--json", action="store_true", help="one JSON object per query per line")
    search.add_argument("--filters", help='metadata filter, JSON containment: \'{"year": 2024}\'')
    search.add_argument("--include-archive", action="store_true",
                        help="also search the row archive (aged rows on the object store, exact; hits say source_tier archive)")
    search.add_argument("--since", type=_timestamp, help="only rows whose source timestamp is at or after this (ISO date or time, UTC)")
    search.add_argument("--until", type=_timestamp, help="only rows whose source timestamp is before this (ISO date or time, UTC)")
    search.add_argument("--consistent", action="store_true",
                        help="read the primary, not a replica (VP_PG_READ_DSN): see what an ingest just wrote")
    search.set_defaults(func=cmd_search)

    maint = sub.add_parser("maintenance", help="VACUUM (ANALYZE) the vector tables, check their health, refresh the "
                           "storage overview (maintenance_job; nightly by maintenance_schedule); exit 1 if a check fails")
    maint.set_defaults(func=cmd_maintenance)

    recall = sub.add_parser("recall", help="measure a collection's index recall@10 on a sample of its logged queries "
                            "(recall_monitoring_job; weekly by recall_monitoring_schedule); exit 1 below the target")
    recall.add_argument("name")
    recall.set_defaults(func=cmd_recall)

    aud = sub.add_parser("audit", help="the audit log of searches (written while VP_AUDIT=1), newest first")
    aud.add_argument("--collection", help="only searches of this collection")
    aud.add_argument("--principal", help="only searches by this API key name or OS user")
    aud.add_argument("--since", type=_timestamp, help="only searches at or after this (ISO date or time, UTC)")
    aud.add_argument("--limit", type=int, default=50)
    aud.add_argument("--json", action="store_true", help="one JSON object per line")
    aud.set_defaults(func=cmd_audit)

    archive_rows = sub.add_parser(
        "archive-rows", help="move the collection's rows older than its archive_rows_older_than_days rule to the row archive now "
        "(row_archive_job; the nightly schedule does the same)")
    archive_rows.add_argument("name")
    archive_rows.set_defaults(func=cmd_archive_rows)

    get = sub.add_parser("get", help="one document by id: Postgres first, then the row archive")
    get.add_argument("name")
    get.add_argument("doc_id")
    get.add_argument("--json", action="store_true", help="the document as one JSON object")
    get.set_defaults(func=cmd_get)

    tier = sub.add_parser("tier", help="move a collection between tiers: active | cold | archived (runs its Dagster job)")
    tier.add_argument("name")
    tier.add_argument("tier", choices=["active", "cold", "archived"])
    tier.add_argument("--wait", action="store_true", help="wait for the run and print its result (default: print the run id)")
    tier.set_defaults(func=cmd_tier)

    serve = sub.add_parser("serve", help="the HTTP search API (POST /search, GET /collections, GET /healthz)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080)
    serve.set_defaults(func=cmd_serve)

    metrics = sub.add_parser("metrics", help="serve only GET /metrics (Prometheus): run figures, tiers, dead letters, pools")
    metrics.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    metrics.add_argument("--port", type=int, default=9464)
    metrics.set_defaults(func=cmd_metrics)

    status = sub.add_parser("status", help="collections, tiers, counts and sizes")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    dead = sub.add_parser("dead-letters", help="list open dead letters, or replay them")
    dead.add_argument("--collection")
    dead.add_argument("--json", action="store_true")
    dead.set_defaults(func=cmd_dead_letters)
    dead_sub = dead.add_subparsers(dest="action")
    replay = dead_sub.add_parser("replay", help="retry a collection's open embedding dead letters (runs dead_letter_replay_job)")
    replay.add_argument("name")
    replay.set_defaults(func=cmd_dead_letters_replay)

    models = sub.add_parser("models", help="register and list embedding models").add_subparsers(dest="action", required=True)
    madd = models.add_parser("add", help="register a model version (an OpenAI-compatible API or a bundled local model)")
    madd.add_argument("key")
    madd.add_argument("--provider", choices=["local", "openai"], default="openai")
    madd.add_argument("--model-name", required=True, help="the API's model name (or the local model's)")
    madd.add_argument("--dims", type=int, required=True)
    madd.add_argument("--distance", default="cosine", choices=["cosine", "l2", "inner_product"])
    madd.add_argument("--storage-type", default="vector", choices=["vector", "halfvec", "binary"],
                      help="halfvec halves the table and index; binary keeps the table, indexes one bit per dimension and "
                      "re-ranks rerank_factor x k candidates at full precision; vector models over 2,000 dims get a halfvec index")
    madd.add_argument("--max-tokens", type=int, default=8191)
    madd.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (default $OPENAI_BASE_URL)")
    madd.add_argument("--dimensions-param", type=int, help="send `dimensions` to the API (models that shorten vectors)")
    madd.add_argument("--option", action="append", help="KEY=VALUE model option (limits: max_inputs_per_request, "
                      "max_tokens_per_request, max_in_flight, requests_per_minute, tokens_per_minute, timeout_s, api_key_env…)")
    madd.set_defaults(func=cmd_models_add)
    mup = models.add_parser(
        "upgrade", help="move collections to another model: one Dagster backfill into shadow tables, a quality gate, a swap"
    )
    mup.add_argument("collections", nargs="+")
    mup.add_argument("--to", required=True, help="the new model's key (register it first with `models add`)")
    mup.add_argument("--wait", action="store_true", help="wait for the backfill (starting a dagster-daemon if none runs), then swap")
    mup.add_argument("--no-swap", action="store_true", help="with --wait: build and gate the shadows, keep serving the old model")
    mup.add_argument("--rehydrate", action="store_true",
                     help="with --wait: bring cold collections back to active after their swap (they stay cold otherwise)")
    mup.set_defaults(func=cmd_models_upgrade)
    mretry = models.add_parser("retry", help="re-execute a failed upgrade backfill from failure (only what failed)")
    mretry.add_argument("backfill_id")
    mretry.add_argument("--wait", action="store_true")
    mretry.add_argument("--no-swap", action="store_true")
    mretry.set_defaults(func=cmd_models_retry)
    mswap = models.add_parser("swap", help="serve another attached model (refused unless its quality gate passed)")
    mswap.add_argument("name")
    mswap.add_argument("--to", required=True)
    mswap.set_defaults(func=cmd_models_swap)
    mroll = models.add_parser("rollback", help="serve the previous model again (while its table is retained)")
    mroll.add_argument("name")
    mroll.set_defaults(func=cmd_models_rollback)
    mretire = models.add_parser("retire", help="drop previous models' tables past retain_previous_days")
    mretire.set_defaults(func=cmd_models_retire)
    mabandon = models.add_parser("abandon", help="give up an upgrade target: drop its shadow table, stop writing it")
    mabandon.add_argument("collection")
    mabandon.add_argument("model")
    mabandon.set_defaults(func=cmd_models_abandon)
    mlist = models.add_parser("list", help="registered models")
    mlist.add_argument("--json", action="store_true")
    mlist.set_defaults(func=cmd_models_list)

    dbp = sub.add_parser("db", help="the embedded PostgreSQL server under $VP_HOME/pg (start | stop | status), and the "
                         "read-only role search runs as (reader-role)")
    dbp.add_argument("action", choices=["start", "stop", "status", "reader-role"])
    dbp.add_argument("--name", default="vp_reader", help="reader-role: the role's name (default vp_reader)")
    dbp.add_argument("--password-env", default="VP_PG_READ_PASSWORD", metavar="VAR",
                     help="reader-role: the environment variable holding its password (unset: a NOLOGIN role)")
    dbp.add_argument("--json", action="store_true")
    dbp.set_defaults(func=cmd_db)

    demo = sub.add_parser("demo", help="ingest the Python standard library's docstrings and search them")
    demo.add_argument("--limit", type=int, default=400, help="documents in the demo corpus")
    demo.set_defaults(func=cmd_demo)

    dev = sub.add_parser("dev", help="start the Dagster UI on 127.0.0.1")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=3000)
    dev.set_defaults(func=cmd_dev)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    # platformdirs warns on every command when XDG_RUNTIME_DIR is unset (containers); the fallback is fine.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    # Dagster flags APIs it may still change (backfill policies, sensor owners) on every import:
    # a note for us, not for someone running a command.
    warnings.filterwarnings("ignore", message=r".* is currently in (beta|preview)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        logs.setup()  # masking always; JSON lines on stderr with VP_LOG_FORMAT=json
        with logs.log_context(command=args.command, collection=getattr(args, "name", None)):
            return args.func(args)
    except (InvalidName, KeyError, ValueError, FileNotFoundError, RuntimeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {logs.redact(str(message))}", file=sys.stderr)
        return 2
    except Exception as err:
        import psycopg

        if not isinstance(err, psycopg.OperationalError):
            raise
        # PostgreSQL stopped or unreachable before any run began: said plainly, no traceback.
        from vector_platform import db, runs
        from vector_platform.settings import vp_home

        dsn = os.environ.get("VP_PG_DSN")
        where = db.describe(dsn) if dsn else f"the embedded database under {vp_home() / 'pg'}"
        message = runs.plain_database_error(f"{type(err).__module__}.{type(err).__name__}: {err}", where)
        print(f"error: {logs.redact(message)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
