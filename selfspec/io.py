"""Atomic file writes and the run directory.

Every file a stage produces is written to a temporary name in the same folder
and renamed into place, so a killed run never leaves a half-written file. Run
directories may be local paths or any `pyarrow.fs` URI (s3://, gs://, file://).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable


_UMASK = os.umask(0)
os.umask(_UMASK)


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = str(path)
    if _is_uri(path):
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        # Object stores make a key visible only once its upload completes.
        with fs.open_output_stream(inner) as out:
            out.write(data)
        return
    path = path.removeprefix("file://")
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def file_digest(path: str | os.PathLike) -> str:
    """Short sha256 of a file's content (a local path or a `pyarrow.fs` URI)."""
    h = hashlib.sha256()
    if _is_uri(str(path)):
        h.update(read_bytes(path))
        return h.hexdigest()[:16]
    with open(str(path).removeprefix("file://"), "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(read_bytes(path))


def read_bytes(path: str | os.PathLike) -> bytes:
    path = str(path)
    if _is_uri(path):
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(inner) as f:
            return f.read()
    return Path(path.removeprefix("file://")).read_bytes()


def exists(path: str | os.PathLike) -> bool:
    path = str(path)
    if _is_uri(path):
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        return fs.get_file_info(inner).type != pafs.FileType.NotFound
    return os.path.exists(path.removeprefix("file://"))


def write_parquet(path: str | os.PathLike, rows: list[dict[str, Any]], schema=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_parquet(path: str | os.PathLike) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(read_bytes(path))).to_pylist()


@dataclass(frozen=True)
class RunDir:
    """`runs/<name>/`: config.yaml, data/, adapters/, eval/, report.html.

    Stages communicate only through these files, so each can be rerun,
    resumed or inspected alone.
    """

    root: str

    def __post_init__(self) -> None:
        # A file:// run directory is a local one: stages that need real folders (Ray
        # Train storage, adapters that models load, eval's adapter scan) get a plain path.
        if self.root.startswith("file://"):
            object.__setattr__(self, "root", self.root.removeprefix("file://"))

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def data(self) -> str:
        return self.path("data")

    @property
    def adapters(self) -> str:
        return self.path("adapters")

    @property
    def eval(self) -> str:
        return self.path("eval")

    def local(self) -> Path:
        """The run directory as a local path; stages that need a real folder use it."""
        if _is_uri(self.root):
            raise ValueError(f"run directory {self.root} is remote; this stage needs a local path")
        return Path(self.root.removeprefix("file://"))


def run_dir_for(config) -> RunDir:
    return RunDir(f"{config.runs_dir.rstrip('/')}/{config.name}")
