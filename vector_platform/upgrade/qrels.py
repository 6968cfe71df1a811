"""Labelled queries in the BEIR format: `queries.jsonl` ({"_id": ..., "text": ...} per line)
and a qrels TSV (query-id, corpus-id, score; an optional header line).

Bad lines are refused with their line number; nothing is stored from a file that fails.
"""

from __future__ import annotations

import json
from pathlib import Path


class QrelsError(ValueError):
    """A qrels or queries file that cannot be read as BEIR."""


def read_beir(path: Path, queries: Path | None = None) -> tuple[dict[str, str], list[tuple[str, str, int]]]:
    """(query id -> text, [(query id, doc id, relevance)]) from a qrels file or a BEIR folder.

    A folder: its queries.jsonl and qrels/test.tsv. A file: the qrels TSV, with `queries`
    given or a queries.jsonl beside it or one folder up (BEIR's layout).
    """
    if path.is_dir():
        qrels_file = path / "qrels" / "test.tsv"
        queries = queries or path / "queries.jsonl"
    else:
        qrels_file = path
        if queries is None:
            for candidate in (path.parent / "queries.jsonl", path.parent.parent / "queries.jsonl"):
                if candidate.exists():
                    queries = candidate
                    break
    if not qrels_file.exists():
        raise FileNotFoundError(f"qrels file {str(qrels_file)!r} does not exist")
    if queries is None or not queries.exists():
        raise FileNotFoundError(f"no queries file for {str(qrels_file)!r}: give --queries queries.jsonl")
    judgements = read_qrels(qrels_file)
    texts = read_queries(queries)
    missing = sorted({q for q, _, _ in judgements} - set(texts))
    if len(missing) == len({q for q, _, _ in judgements}):
        raise QrelsError(f"none of the queries judged in {qrels_file} is in {queries}")
    return texts, [j for j in judgements if j[0] in texts]


MAX_GRADE = 10  # BEIR and TREC grade relevance 0-3 (some -1/-2 for spam: counted as not relevant)


def read_qrels(path: Path) -> list[tuple[str, str, int]]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise QrelsError(f"{path} is not UTF-8 text ({err})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if number == 1 and parts[:2] == ["query-id", "corpus-id"]:
            continue
        if len(parts) == 4:  # TREC style: query 0 doc relevance
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            raise QrelsError(f"{path}:{number}: expected 'query-id<TAB>corpus-id<TAB>score', got {line[:80]!r}")
        try:
            relevance = int(parts[2])
        except ValueError:
            raise QrelsError(f"{path}:{number}: score {parts[2]!r} is not an integer relevance grade") from None
        if relevance > MAX_GRADE:
            raise QrelsError(
                f"{path}:{number}: score {relevance} is over {MAX_GRADE}; relevance grades are small integers "
                f"(0 = not relevant). A truncated or concatenated line? {line[:80]!r}"
            )
        out.append((parts[0].strip(), parts[1].strip(), relevance))
    if not out:
        raise QrelsError(f"{path} holds no judgements")
    return out


def read_queries(path: Path) -> dict[str, str]:
    texts = {}
    with path.open(encoding="utf-8", errors="strict") as handle:
        try:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    texts[str(row["_id"])] = str(row["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise QrelsError(f"{path}:{number}: expected a JSON object with _id and text ({err})") from None
        except UnicodeDecodeError as err:
            raise QrelsError(f"{path} is not UTF-8 text ({err})") from None
    return texts
