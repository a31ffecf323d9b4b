"""The curation output directory and its inputs' checksums: staging under ``_work/``, the commit
that swaps staged outputs in (a rename locally, a server-side copy on an object store, which has
no rename), and the per-input BLAKE2b checksums of the manifest and the refresh ledger.

Split out of pipelines/curate.py (the rules are in its docstring, "Reruns"); every name is
re-exported there.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from core.storage import move, remove, resolve
from pipelines.inputs import SourceFile


def _out_fs(out: str) -> tuple[Any, str, str]:
    fs, path, prefix = resolve(out)
    return fs, path.rstrip("/"), prefix


def _clean(fs: Any, root: str, work: str) -> None:
    """Remove the scratch of a previous (possibly interrupted) run. The previous outputs stay whole
    until this run's outputs are complete (_commit): a run that dies (killed, disk full) never
    leaves partial files in data/ and never destroys a finished corpus."""
    fs.create_dir(root, recursive=True)
    if fs.get_file_info(work).type == pafs.FileType.Directory:
        fs.delete_dir(work)
    fs.create_dir(work, recursive=True)


def _commit(fs: Any, root: str, stage: str) -> None:
    """Swap the staged outputs in: the old stats.json goes first (from here the directory is
    incomplete), then each output is replaced by its staged copy (a rename on a local disk, a
    server-side copy on an object store, which has no rename: core.storage.move)."""
    remove(fs, f"{root}/stats.json")
    for name in ("data", "rejects", "tokenizer", "manifest.json", "report.html"):
        remove(fs, f"{root}/{name}")
        if name != "report.html" or fs.get_file_info(f"{stage}/{name}").type == pafs.FileType.File:
            move(fs, f"{stage}/{name}", f"{root}/{name}")


def _local_tokenizer_dir(root: str, uri_prefix: str) -> Path:
    if not uri_prefix:
        return Path(root) / "tokenizer"
    import tempfile

    return Path(tempfile.mkdtemp(prefix="mm-tokenizer-")) / "tokenizer"


def _write_text(fs: Any, path: str, text: str) -> None:
    with fs.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))


def checksum_inputs(files: list[SourceFile]) -> list[dict]:
    """uri, size and a BLAKE2b checksum per input file, computed in parallel Ray tasks. A folder's
    checksum covers its listing (relative path, size, mtime) rather than every file's bytes.
    One CPU per task: hashing is CPU-bound, and a fractional reservation would start more
    worker processes than cores (one per input file, up to 4 per core), which stay resident."""
    import ray

    items = [{"i": i} for i in range(len(files))]
    ds = ray.data.from_items(items).map(_checksum_row, fn_kwargs={"files": files}, num_cpus=1)
    rows = sorted(ds.take_all(), key=lambda r: r["i"])
    return [{k: v for k, v in r.items() if k != "i"} for r in rows]


def _checksum_row(row: dict, files: list[SourceFile]) -> dict:
    f = files[row["i"]]
    h = hashlib.blake2b(digest_size=32)
    if f.kind == "folder":
        infos = f.fs.get_file_info(pafs.FileSelector(f.path, recursive=True))
        for info in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
            h.update(f"{info.path[len(f.path):]}\0{info.size}\0{info.mtime_ns}\n".encode())
        kind = "blake2b-256-listing"
    else:
        with f.fs.open_input_stream(f.path) as fh:
            while chunk := fh.read(8 << 20):
                h.update(chunk)
        kind = "blake2b-256"
    return {"i": row["i"], "uri": f.uri, "kind": f.kind, "size": f.size, "checksum": f"{kind}:{h.hexdigest()}"}
