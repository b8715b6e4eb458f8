"""Corpus ingestion: documents from JSONL, Parquet or a folder of text files, cut into passages.

A document is `{"id", "title", "text"}`. JSONL and Parquet rows may name the text
`text`, `contents`, `content`, `passage` or `body`; a row without an id gets the
hash of its text, so ids never depend on row order. Files in a folder take their
relative path as id. Passages are windows of `chunk_tokens` whitespace-separated
words overlapping by `chunk_overlap`, with the id `<document id>#<window number>`:
the same corpus always gives the same ids, and editing one document leaves the
ids of the others alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterator, TypedDict

from selfspec.config import ConfigError

BUILTIN_CORPORA = Path(__file__).resolve().parent.parent / "resources" / "corpora"
TEXT_FIELDS = ("text", "contents", "content", "passage", "body")
ID_FIELDS = ("id", "_id", "doc_id", "docid")
TEXT_SUFFIXES = (".txt", ".md", ".markdown")
WORD = re.compile(r"\S+")


class CorpusError(ConfigError):
    """A corpus that cannot be read; the message names the file (and line)."""


class Passage(TypedDict):
    id: str
    doc_id: str
    chunk: int
    title: str
    text: str


def resolve_corpus(ref: str | None, domain: str) -> Path:
    """`builtin:DOMAIN` (or None: the seeds' domain) -> the bundled corpus; else the path."""
    name = ref.split(":", 1)[1] if ref and ref.startswith("builtin:") else None if ref else domain
    if name is not None:
        path = BUILTIN_CORPORA / f"{name}.jsonl"
        if not path.is_file():
            known = ", ".join(f"builtin:{p.stem}" for p in sorted(BUILTIN_CORPORA.glob("*.jsonl")))
            how = f"'{ref}'" if ref else f"none for the seeds' domain '{domain}'; set retrieval.corpus"
            raise CorpusError(f"retrieval.corpus: no builtin corpus {how} (builtin: {known})")
        return path
    path = Path(ref)
    if not path.exists():
        raise CorpusError(f"retrieval.corpus: {path} does not exist")
    return path


def corpus_files(path: Path) -> list[Path]:
    """The files a corpus is read from, in a stable order."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise CorpusError(f"{path}: no {', '.join(TEXT_SUFFIXES)} files in this folder")
        return files
    return [path]


def corpus_fingerprint(path: Path) -> str:
    """Hash of the corpus files' names and bytes: any edit, addition or removal changes it."""
    digest = hashlib.sha256()
    for file in corpus_files(path):
        name = file.relative_to(path).as_posix() if path.is_dir() else file.name
        digest.update(name.encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _document(source: str, row: dict[str, Any]) -> dict[str, str]:
    if not isinstance(row, dict):
        raise CorpusError(f"{source}: expected an object, got {type(row).__name__}")
    text_key = next((k for k in TEXT_FIELDS if k in row), None)
    if text_key is None or not isinstance(row[text_key], str):
        raise CorpusError(f"{source}: no text field (one of {', '.join(TEXT_FIELDS)}) holding a string")
    text = row[text_key]
    id_key = next((k for k in ID_FIELDS if row.get(k) not in (None, "")), None)
    doc_id = str(row[id_key]) if id_key else hashlib.sha256(text.encode()).hexdigest()[:12]
    return {"id": doc_id, "title": str(row.get("title") or ""), "text": text}


def _jsonl_documents(path: Path) -> Iterator[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
            yield _document(f"{path}:{number}", row)


def _parquet_documents(path: Path) -> Iterator[dict[str, str]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input error
        raise CorpusError(f"{path}: not a readable Parquet file ({exc})") from None
    for number, row in enumerate(rows, start=1):
        yield _document(f"{path}: row {number}", row)


def _text_document(root: Path, file: Path) -> dict[str, str]:
    text = file.read_text(encoding="utf-8", errors="replace")
    heading = re.search(r"^#\s+(.+)$", text, re.MULTILINE) if file.suffix.lower() != ".txt" else None
    doc_id = file.relative_to(root).as_posix() if root.is_dir() else file.name
    return {"id": doc_id, "title": heading.group(1).strip() if heading else "", "text": text}


def read_documents(path: Path) -> list[dict[str, str]]:
    """All documents of a corpus; a duplicate id or a row without text stops with file:line."""
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in TEXT_SUFFIXES:
        documents = [_text_document(path, f) for f in corpus_files(path)]
    elif suffix == ".jsonl":
        documents = list(_jsonl_documents(path))
    elif suffix == ".parquet":
        documents = list(_parquet_documents(path))
    else:
        raise CorpusError(f"{path}: a corpus is a .jsonl or .parquet file, or a folder of {', '.join(TEXT_SUFFIXES)} files")
    seen: set[str] = set()
    for doc in documents:
        if doc["id"] in seen:
            raise CorpusError(f"{path}: duplicate document id '{doc['id']}'")
        seen.add(doc["id"])
    return documents


def chunk_spans(text: str, chunk_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """Character spans of word windows; the last window ends at the last word."""
    words = [m.span() for m in WORD.finditer(text)]
    if not words:
        return []
    stride = chunk_tokens - overlap
    starts = range(0, max(len(words) - overlap, 1), stride)
    return [(words[s][0], words[min(s + chunk_tokens, len(words)) - 1][1]) for s in starts]


def make_passages(documents: list[dict[str, str]], chunk_tokens: int, overlap: int) -> list[Passage]:
    """Cut documents into passages with stable ids; documents without words give none."""
    passages: list[Passage] = []
    for doc in documents:
        for number, (start, end) in enumerate(chunk_spans(doc["text"], chunk_tokens, overlap)):
            passages.append(
                Passage(id=f"{doc['id']}#{number}", doc_id=doc["id"], chunk=number, title=doc["title"], text=doc["text"][start:end])
            )
    return passages


def passage_schema():
    import pyarrow as pa

    return pa.schema(
        [("id", pa.string()), ("doc_id", pa.string()), ("chunk", pa.int32()), ("title", pa.string()), ("text", pa.string())]
    )
