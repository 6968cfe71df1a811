"""`make demo`: ingest the Python standard library's docstrings and search them.

The corpus needs no download: it is built from the docstrings of the interpreter running
the demo (one document per module, class or function with a substantial docstring).
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import warnings

from vector_platform.settings import vp_home

# Modules with side effects on import, or GUI/test-only ones.
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "pydoc_data", "ensurepip", "venv", "__main__"}
QUERIES = [
    "parse command line arguments",
    "read and write compressed zip archives",
    "compute a cryptographic hash of bytes",
    "schedule a coroutine to run concurrently",
]


def stdlib_documents(limit: int, min_chars: int = 300) -> list[dict]:
    docs: list[dict] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(sys.stdlib_module_names):
            if name.startswith("_") or name in SKIP:
                continue
            try:
                module = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - platform-specific modules are simply absent
                continue
            candidates = [(name, module)] + [
                (f"{name}.{attr}", obj)
                for attr, obj in sorted(vars(module).items())
                if not attr.startswith("_")
                and (inspect.isclass(obj) or inspect.isfunction(obj))
                and getattr(obj, "__module__", None) == name
            ]
            for qualname, obj in candidates:
                doc = inspect.getdoc(obj)
                if doc and len(doc) >= min_chars:
                    docs.append({"id": qualname, "title": qualname, "text": doc, "metadata": {"module": name}})
    # Spread the corpus over many modules rather than the first few alphabetically.
    step = max(1, len(docs) // limit)
    return docs[::step][:limit]


def run_demo(limit: int = 400) -> int:
    from vector_platform.api import Platform
    from vector_platform.cli import _print_result

    corpus = vp_home() / "demo" / "stdlib_docs.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    docs = stdlib_documents(limit)
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    print(f"demo corpus: {len(docs)} docstrings of the Python {sys.version_info.major}.{sys.version_info.minor} standard library -> {corpus}")

    vp = Platform()
    vp.add_collection("stdlib_docs", corpus)
    print("ingesting through Dagster (source_documents -> chunks -> embeddings -> vector_table -> hnsw_index -> serving_view) ...")
    runs = vp.ingest("stdlib_docs", allow_deletes=True)  # the corpus is regenerated (another --limit is fine)
    for run in runs:
        checks = ", ".join(f"{name}={'passed' if ok else 'FAILED'}" for name, ok in run.checks.items())
        print(f"  {run.job} [{run.partition}]: {'ok' if run.success else 'FAILED'} {checks}")
        if not run.success:
            print(f"  error: {run.error}")
            return 1
    for query in QUERIES:
        print()
        _print_result(vp.search(query, ["stdlib_docs"], k=3), as_json=False)
    print()
    status = vp.status()
    for c in status["collections"]:
        print(
            f"status: {c['name']} tier={c['tier']} documents={c['documents']} chunks={c['chunks']} "
            f"vectors={c['vectors']} dead_letters={c['dead_letters']} bytes_postgres={c['bytes_postgres']}"
        )
    print(json.dumps({"collections": [{k: c[k] for k in ("name", "tier", "documents", "chunks", "vectors")} for c in status["collections"]]}))
    return 0
