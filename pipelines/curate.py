"""Curation: composes the stages into Ray Data plans, from raw sources to tokenised Parquet.

    cfg = load_config(CurateConfig, "configs/curate.yaml", ["images.image_px=128"])
    stats = run_curate(["shards/{00000..00009}.tar", "folder/"], "out/", cfg)   # Ray initialised

Passes (each a streaming Ray Data plan; memory stays flat as the corpus grows):

1. **process**: read every source (pipelines/listing.py, datasources.py) → download URL rows
   (pipelines/download.py) → ``process_batch`` (the modality's pure batch function: captions,
   decode/validate/resize, hashes) → ``DIR/_work/processed/*.parquet``: one *work row* per
   input (image) or per clip (video), kept candidate or reject.
2. **dedup**: reads only the small columns of the kept candidates (``WORK_COLUMNS`` minus media)
   and finds exact and near duplicates across the whole corpus (pipelines/dedup.py) → the drop
   list ``(row_id, reason, keeper sample_id)``.
3. **tokenizer**: trained on the kept captions (in ``sample_id`` order) or loaded → ``DIR/tokenizer``.
4. **write**: kept rows, tokenised and split → ``DIR/data/*.parquet`` (``schema.schema_for``),
   ``rows_per_file`` rows per shard; every reject → ``DIR/rejects/*.parquet`` (REJECT_SCHEMA).
5. **stats/manifest/report**: ``stats.json`` (counts per reason, histograms, the invariant),
   ``manifest.json`` (inputs with checksums, resolved config, code version, time) and
   ``report.html`` (pipelines/curate_report.py: counts, plots, samples, duplicate pairs with
   their evidence, near misses; bounded samples, never the corpus).

A duplicate's reject ``detail`` is its keeper's ``sample_id``, a space, then the evidence as
``name=value`` tokens (``dedup.drop_details``/``dedup.parse_detail``), e.g.
``"<keeper> hamming=3 residual=6.1 limit=22.0"`` or ``"<keeper> exact=media"``.

Work rows (the hook for other modalities): a modality's batch function maps INPUT_SCHEMA
records to rows carrying ``WORK_COLUMNS`` — ``row_id`` (unique per row), ``sample_id``,
``source``, ``key``, ``caption``, ``content_hash``, ``hashes`` (list<int64>), ``area``,
``orig_width``, ``orig_height``, ``label``, ``stage``/``reason``/``detail`` (reason null = kept
candidate) — plus the columns of its output schema. Images: ``images.process_image_batch``;
video: ``video_clips.process_video_batch``.

Reruns: a run starts by removing ``_work/``; outputs are written under ``_work/out/`` and renamed
into place only when complete, then ``stats.json`` is written last, so a directory with
``stats.json`` is complete and a failed run leaves the previous outputs whole. Ids, splits and the keeper rule are
content-derived, so a rerun gives the same rows, and an interrupted run rerun to completion
leaves no duplicate and no missing row. The staging, commit and input checksums are in
pipelines/curate_output.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from core.config import to_dict
from core.lineage import code_version
from core.progress import Progress, report
from core.storage import move
from pipelines import stats as stats_mod
from pipelines.captions import CaptionConfig, check_language_support
from pipelines.curate_output import (
    _clean,
    _commit,
    _local_tokenizer_dir,
    _out_fs,
    _write_text,
    checksum_inputs,
)
from pipelines.curate_report import NEAR_MISSES, write_curate_report
from pipelines.datasources import has_urls, read_inputs
from pipelines.dedup import DROP_SCHEMA, DedupConfig, drop_details, find_duplicates, thumbs_from
from pipelines.images import ImageConfig, process_image_batch
from pipelines.inputs import SourceFile
from pipelines.listing import expand_sources
from pipelines.schema import REJECT_SCHEMA, assign_split, schema_for
from pipelines.semdedup import SEMANTIC_COLUMNS, check_semantic, embed_batch, semantic_duplicates
from pipelines.sources import SourceConfig
from pipelines.tokenize import TokenizerConfig, build_tokenizer, tokenize_batch
from pipelines.video import VideoConfig

log = logging.getLogger(__name__)

WORK_COLUMNS = ("row_id", "sample_id", "source", "key", "caption", "content_hash", "hashes", "area",
                "orig_width", "orig_height", "label", "stage", "reason", "detail")
#: Image work rows also carry the near-duplicate verification descriptors (pipelines/dedup_verify.py).
IMAGE_DEDUP_COLUMNS = ("crop_hashes",)  # the thumbnails are read per candidate pair
#: A run's scratch under DIR, removed at the end unless ``output.keep_work``. Its ``processed/``
#: holds every work row (WORK_COLUMNS + the modality's columns) as Parquet; pipelines/incremental.py
#: reads the kept rows' dedup columns and original sizes there to index a snapshot.
WORK_DIR = "_work"
WORK_ROWS_DIR = f"{WORK_DIR}/processed"


@dataclass(frozen=True)
class OutputConfig:
    rows_per_file: int = 10_000          # rows per data/ Parquet shard
    reject_rows_per_file: int = 100_000
    val_fraction: float = 0.05           # of sample_ids (hash-based, stable across reruns)
    keep_work: bool = False              # keep DIR/_work (intermediate Parquet) after success

    def __post_init__(self) -> None:
        if self.rows_per_file <= 0 or self.reject_rows_per_file <= 0:
            raise ValueError("rows_per_file and reject_rows_per_file must be > 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in [0, 1)")


@dataclass(frozen=True)
class ExecutionConfig:
    """Ray Data resources of the curate plans (see ../shared/RAY_NOTES.md for small machines)."""

    # Rows per process task for URL inputs (the task downloads them, then decodes them). Tars,
    # manifests and folders are processed as their read blocks (sources.rows_per_block), with no
    # batch_size on the process map: a batch_size there stops Ray Data fusing the read into the
    # process task, and the unfused read held a core while backpressured (measured: 20k inputs,
    # process pass 92 s -> 57 s once fused). One work file per process task.
    batch_rows: int = 256
    num_cpus_per_task: float = 1.0       # of the process stage (which also downloads URL rows)
    # dedup/finalise/stats stages. A whole CPU each: with fractional reservations Ray starts more
    # worker processes than cores, more of them the more blocks a corpus has, and each stays
    # resident afterwards (150-250 MB PSS): that was the peak-memory growth from 2k to 20k inputs.
    light_num_cpus: float = 1.0
    # Ray node labels every curation task and actor must match (Ray Data's
    # ExecutionOptions.label_selector). On cluster.yaml's cluster: {mm.io/role: curation}, so no
    # curation work lands on GPU training nodes. Empty: anywhere (a local Ray has no labels).
    node_labels: dict[str, str] = field(default_factory=dict)
    # Object store bytes Ray Data's streaming executor may hold in flight, per CPU of the cluster
    # (its own default is half the object store: ~3.5 GB on a 24 GiB machine, whose pages stay
    # mapped once touched). 0: Ray Data's default.
    object_store_mb_per_cpu: int = 256


@dataclass(frozen=True)
class CurateConfig:
    modality: Literal["image", "video"] = "image"
    sources: SourceConfig = field(default_factory=SourceConfig)
    images: ImageConfig = field(default_factory=ImageConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)


def process_batch(batch: pa.Table, cfg: CurateConfig, progress: Any = None) -> pa.Table:
    """The per-input stage: INPUT_SCHEMA records → work rows, by modality (pure, pyarrow).
    ``progress``: a core.progress handle told how many inputs (and media bytes) were done."""
    if cfg.modality == "video":
        from pipelines.video_clips import process_video_batch

        out = process_video_batch(batch, cfg.video, cfg.captions)
    else:
        out = process_image_batch(batch, cfg.images, cfg.captions)
        if cfg.dedup.semantic.enabled:  # the embedding work column (pipelines/semdedup.py)
            out = embed_batch(out, cfg.dedup.semantic)
    if progress is not None:  # bytes consumed ~ media + caption + two 512-byte tar headers and padding
        nbytes = 1536 * batch.num_rows
        for col in ("media", "caption_raw"):
            if col in batch.column_names:
                nbytes += pc.sum(pc.binary_length(batch.column(col))).as_py() or 0
        report(progress, batch.num_rows, nbytes)
    return out


def download_and_process(batch: pa.Table, cfg: CurateConfig, progress: Any = None) -> Iterator[pa.Table]:
    """URL records → work rows: ``download_chunks`` keeps the worker's ``download_threads``
    fetching ahead while this thread runs ``process_batch`` on the chunks already here. A
    separate download operator (0.25 CPU a task) ran 5,000 local URLs at 193/s against 864/s for
    the same threads in one process: Ray started a worker process per fractional task, and the
    starts and imports took the CPU (bench/ingest_urls.py, docs/BENCHMARKS.md)."""
    from pipelines.download import download_chunks

    for chunk in download_chunks(batch, cfg.sources):
        yield process_batch(chunk, cfg, progress)


# --------------------------------------------------------------------------- finalise stages
def finalize_kept(batch: pa.Table, drops: pa.Array, tokenizer_dir: str, max_tokens: int,
                  val_fraction: float, modality: str) -> pa.Table:
    """Kept rows → output schema: not rejected, not a duplicate; tokenised; split assigned."""
    mask = pc.and_(pc.is_null(batch.column("reason")),
                   pc.invert(pc.is_in(batch.column("row_id"), value_set=drops)))
    t = batch.filter(mask)
    t = tokenize_batch(t, tokenizer_dir, max_tokens)
    split = pa.array([assign_split(s, val_fraction) for s in t.column("sample_id").to_pylist()], pa.string())
    t = t.append_column("split", split)
    schema = schema_for(modality)
    return t.select(schema.names).cast(schema)


def finalize_rejects(batch: pa.Table, drops: pa.Table) -> pa.Table:
    """Reject rows: stage rejects as they are, duplicates with the keeper's sample_id and the
    evidence in detail (``dedup.drop_details``)."""
    idx = pc.index_in(batch.column("row_id"), value_set=drops.column("row_id"))
    is_dup = pc.is_valid(idx)
    reason = pc.if_else(is_dup, pc.take(drops.column("reason"), idx), batch.column("reason"))
    detail = pc.if_else(is_dup, pc.take(drop_details(drops), idx), batch.column("detail"))
    stage = pc.if_else(is_dup, pa.scalar("dedup"), batch.column("stage"))
    t = pa.table({"source": batch.column("source"), "key": batch.column("key"), "stage": stage,
                  "reason": reason, "detail": detail})
    t = t.filter(pc.is_valid(t.column("reason")))
    return t.cast(REJECT_SCHEMA)


def stats_partial(batch: pa.Table, drops: pa.Array, tokenizer_dir: str, max_tokens: int,
                  val_fraction: float) -> pa.Table:
    """Histogram partials of the kept rows among the candidates (see stats.histogram_partials)."""
    t = batch.filter(pc.invert(pc.is_in(batch.column("row_id"), value_set=drops)))
    t = tokenize_batch(t, tokenizer_dir, max_tokens)
    split = [assign_split(s, val_fraction) for s in t.column("sample_id").to_pylist()]
    return stats_mod.histogram_partials(t.append_column("split", pa.array(split, pa.string())))


def count_partial(batch: pa.Table) -> pa.Table:
    """Per-batch counts of (stage, reason) of rejects: rows of (stage, reason, n)."""
    counts: dict[tuple[str, str], int] = {}
    for s, r in zip(batch.column("stage").to_pylist(), batch.column("reason").to_pylist()):
        counts[(s, r)] = counts.get((s, r), 0) + 1
    return pa.table({"stage": [k[0] for k in counts], "reason": [k[1] for k in counts],
                     "n": pa.array(list(counts.values()), pa.int64())})


# --------------------------------------------------------------------------- the run
def run_curate(sources: list[str], out: str, cfg: CurateConfig) -> dict:
    """Curate ``sources`` into ``out`` (Ray already initialised); return stats."""
    import ray

    ctx = ray.data.DataContext.get_current()
    options = ctx.execution_options
    previous = options.label_selector, options.resource_limits
    options.label_selector = dict(cfg.execution.node_labels) or previous[0]
    if cfg.execution.object_store_mb_per_cpu:
        budget = cfg.execution.object_store_mb_per_cpu * 2**20 * max(1.0, ray.cluster_resources().get("CPU", 1))
        options.resource_limits = options.resource_limits.copy(object_store_memory=budget)
    try:
        return _run_curate(sources, out, cfg)
    finally:
        options.label_selector, options.resource_limits = previous


def _run_curate(sources: list[str], out: str, cfg: CurateConfig) -> dict:
    import ray

    t0 = time.time()
    check_language_support(cfg.captions)
    check_semantic(cfg.dedup, cfg.modality)
    files = expand_sources(list(sources))
    fs, root, uri_prefix = _out_fs(out)
    work = f"{root}/{WORK_DIR}"
    stage = f"{work}/out"  # outputs are staged here and swapped in at the end (_commit)
    _clean(fs, root, work)
    ex = cfg.execution
    light = {"batch_format": "pyarrow", "num_cpus": ex.light_num_cpus}
    importer = _import_in_background("transformers", ("AutoTokenizer", "BertTokenizerFast", "PreTrainedTokenizerFast"))

    # 1. process -------------------------------------------------------------------------------
    ds = read_inputs(files, cfg.sources)
    per_input = process_batch
    if has_urls(files):
        # URLs are fetched inside the process task, on its worker's download threads, while the
        # task decodes the rows already fetched (img2dataset's layout). One manifest is read as a
        # few large blocks, so they are cut to batch_rows first: tasks for every core.
        ds = ds.repartition(target_num_rows_per_block=ex.batch_rows)
        per_input = download_and_process
    known = all(f.kind == "tar" for f in files) and not has_urls(files)  # input bytes known: an ETA
    with Progress("process", total_bytes=sum(f.size for f in files) if known else None,
                  unit="videos" if cfg.modality == "video" else "inputs") as progress:
        ds = ds.map_batches(per_input, fn_kwargs={"cfg": cfg, "progress": progress.handle},
                            batch_format="pyarrow",
                            batch_size=cfg.video.videos_per_task if cfg.modality == "video" else None,
                            num_cpus=ex.num_cpus_per_task)
        # One file per process task, fused into it. No min_rows_per_file: Ray Data bundles that many
        # rows into each task before the map, which left one core busy on 2k inputs (measured).
        ds.write_parquet(uri_prefix + f"{root}/{WORK_ROWS_DIR}", filesystem=None if uri_prefix else fs)
    importer.join()  # before this thread imports anything of it: transformers' lazy module is not thread-safe
    t_process = time.time()
    processed = uri_prefix + f"{root}/{WORK_ROWS_DIR}"

    def read(columns=None):
        ds = ray.data.read_parquet(processed, filesystem=None if uri_prefix else fs)
        return ds.select_columns(columns) if columns else ds  # projection is pushed into the read

    # 2. dedup (ids and hashes of the candidates, held in the object store; ~0.3 KB a row) ---------
    # Thumbnails (4 KB a row) stay in the work rows: verification reads those of candidate pairs.
    candidates = read(["row_id", "sample_id", "source", "key", "caption", "content_hash", "hashes", "area",
                       "orig_width", "orig_height", "stage", "reason", "detail",
                       *(IMAGE_DEDUP_COLUMNS if cfg.modality == "image" else ())]).map_batches(
        _candidates_only, **light).materialize()
    dedup_stats: dict = {}
    if cfg.modality == "video":  # one candidate per clip; a dropped clip takes all its caption rows
        from pipelines import video_accounting as video_mod

        drops = video_mod.find_clip_duplicates(read, cfg.dedup, light)
    else:
        drops = find_duplicates(candidates.drop_columns(["orig_width", "orig_height"]), cfg.dedup,
                                with_evidence=True, stats=dedup_stats, near_misses=NEAR_MISSES,
                                thumbs=thumbs_from(read(["row_id", "thumb"]), light))
    if cfg.dedup.semantic.enabled:  # after exact/near dedup, on their survivors
        drops = semantic_duplicates(read(list(SEMANTIC_COLUMNS)), drops, cfg.dedup)
    drop_ids = drops.column("row_id")
    t_dedup = time.time()

    # 3. tokenizer -----------------------------------------------------------------------------
    tok_local = _local_tokenizer_dir(stage, uri_prefix)
    build_tokenizer(_kept_captions(candidates, drop_ids, cfg, light), cfg.tokenizer, tok_local)
    if uri_prefix:
        pafs.copy_files(str(tok_local), f"{stage}/tokenizer", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
    t_tok = time.time()

    # 4. write ---------------------------------------------------------------------------------
    # Workers on other nodes cannot see the driver's temp dir: on a store they fetch the staged copy.
    tok_shared = uri_prefix + f"{stage}/tokenizer" if uri_prefix else str(tok_local)
    common = {"drops": drop_ids, "tokenizer_dir": tok_shared, "max_tokens": cfg.tokenizer.max_tokens,
              "val_fraction": cfg.output.val_fraction}
    media_cols = [c for c in schema_for(cfg.modality).names if c not in ("input_ids", "split")]
    kept = read(sorted(set(media_cols) | {"row_id", "reason"})).map_batches(
        finalize_kept, fn_kwargs={"modality": cfg.modality, **common}, **light)
    kept.write_parquet(uri_prefix + f"{stage}/data", filesystem=None if uri_prefix else fs,
                       min_rows_per_file=cfg.output.rows_per_file, max_rows_per_file=cfg.output.rows_per_file)
    extra: dict = {}
    if cfg.modality == "video":  # input-level accounting: clip-level drops are stats, not rejects
        rejects, extra = video_mod.video_rejects(read, drops, light)
    else:
        rejects = read(["row_id", "source", "key", "stage", "reason", "detail"]).map_batches(
            finalize_rejects, fn_kwargs={"drops": drops}, **light).materialize()
    rejects.write_parquet(uri_prefix + f"{stage}/rejects", filesystem=None if uri_prefix else fs,
                          min_rows_per_file=cfg.output.reject_rows_per_file,
                          max_rows_per_file=cfg.output.reject_rows_per_file)
    for sub in ("data", "rejects"):
        fs.create_dir(f"{stage}/{sub}", recursive=True)
    t_write = time.time()

    # 5. stats + manifest ------------------------------------------------------------------------
    reject_counts, stage_counts, n_rejected = _reject_counts(rejects, light)
    partials = _rows(candidates.map_batches(stats_partial, fn_kwargs=common, **light))
    n_kept = sum(p["train"] + p["val"] for p in partials)
    n_inputs = _count_inputs(read(["source", "key"]), cfg.modality)
    timings = {k: round(v, 3) for k, v in (("process", t_process - t0), ("dedup", t_dedup - t_process),
                                             ("tokenizer", t_tok - t_dedup), ("write", t_write - t_tok))}
    st = stats_mod.build_stats(modality=cfg.modality, inputs=n_inputs, kept=n_kept, reject_counts=reject_counts,
                               stage_counts=stage_counts, partials=partials,
                               extra={"duplicates_dropped": drops.num_rows, "seconds": timings, **extra})
    if cfg.modality == "video":
        st["invariant_ok"] = n_inputs == st["kept_inputs"] + n_rejected
    if st["invariant_ok"] is False:
        log.error("accounting invariant violated: inputs %d != kept %d + rejected %d",
                  n_inputs, n_kept, n_rejected)
    _write_text(fs, f"{stage}/manifest.json", json.dumps(build_manifest(files, cfg, sources), indent=2) + "\n")
    t_report = time.time()
    try:  # the report is for reading: a failure to draw it never costs the corpus
        media = read(["row_id", "sample_id", "key", "thumb" if cfg.modality == "image" else "frames"])
        write_curate_report(fs, stage, st, media=media, drops=drops, rejects=rejects, light=light, title=out,
                            near_misses=dedup_stats.get("near_misses"))
    except Exception as e:  # noqa: BLE001
        log.warning("report.html not written: %s: %s", type(e).__name__, e)
    st["seconds"]["report"] = round(time.time() - t_report, 3)
    _commit(fs, root, stage)
    st["seconds"]["total"] = round(time.time() - t0, 3)
    _write_text(fs, f"{work}/stats.json", stats_mod.dumps(st))
    move(fs, f"{work}/stats.json", f"{root}/stats.json")  # last: the directory is complete from here
    if not cfg.output.keep_work:
        fs.delete_dir(work)
    log.info("curated %d inputs: %d kept, %d rejected (%s) in %.1f s (%s)", n_inputs, n_kept, n_rejected,
             ", ".join(f"{k}={v}" for k, v in reject_counts.items()), st["seconds"]["total"],
             ", ".join(f"{k} {v:.1f} s" for k, v in st["seconds"].items() if k != "total"))
    return st


def _candidates_only(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch.column("reason"))).drop_columns(["stage", "reason", "detail"])


def _import_in_background(module: str, names: tuple[str, ...] = ()):
    """Import ``module`` and its attributes ``names`` on a daemon thread; returns the thread. The
    tokenizer stage saves through transformers, whose import (with torch's) took 5.2 of its 7.3 s
    on the 20k collage run (cProfile of the driver), after the process pass that the driver spends
    waiting. The caller joins the thread before its own thread touches the module: transformers
    resolves names lazily, and a second thread importing it meanwhile can get a half-initialised
    module (an ``ImportError: cannot import ...`` failed a curate test's setup once in three runs
    of the curate and dedup tests before the join).
    A failed import is left to the stage that needs the module, which raises it there."""
    import importlib
    import threading

    def load() -> None:
        with contextlib.suppress(Exception):
            mod = importlib.import_module(module)
            for name in names:
                getattr(mod, name)

    thread = threading.Thread(target=load, name=f"import-{module}", daemon=True)
    thread.start()
    return thread


def _kept_captions(ds, drop_ids: pa.Array, cfg: CurateConfig, light: dict):
    """Kept captions in sample_id order (deterministic training), at most train_max_captions."""
    rows = _collect(ds.map_batches(_kept_caption_rows, fn_kwargs={"drops": drop_ids}, **light))
    if rows is None:
        return iter(())
    rows = rows.sort_by("sample_id").slice(0, cfg.tokenizer.train_max_captions)
    return iter(rows.column("caption").to_pylist())


def _kept_caption_rows(batch: pa.Table, drops: pa.Array) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch.column("row_id"), value_set=drops))).select(["sample_id", "caption"])


def _reject_counts(ds, light: dict) -> tuple[dict, dict, int]:
    reasons: dict[str, int] = {}
    stages: dict[str, int] = {}
    for row in _rows(ds.map_batches(count_partial, **light)):
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + row["n"]
        stages[row["stage"]] = stages.get(row["stage"], 0) + row["n"]
    return reasons, stages, sum(reasons.values())


def _count_inputs(ds, modality: str) -> int:
    if modality == "image":
        return ds.count()
    keys = set()
    for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        keys.update(zip(b.column("source").to_pylist(), b.column("key").to_pylist()))
    return len(keys)


def _collect(ds) -> pa.Table | None:
    tables = [t for t in ds.iter_batches(batch_size=None, batch_format="pyarrow") if t.num_rows]
    return pa.concat_tables(tables) if tables else None


def _rows(ds) -> list[dict]:
    t = _collect(ds)
    return t.to_pylist() if t is not None else []


# --------------------------------------------------------------------------- manifest
def build_manifest(files: list[SourceFile], cfg: CurateConfig, sources: list[str]) -> dict:
    return {
        "command": "curate",
        "sources": list(sources),
        "inputs": checksum_inputs(files),
        "config": to_dict(cfg),
        "code_version": code_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


__all__ = ["CurateConfig", "OutputConfig", "ExecutionConfig", "WORK_COLUMNS", "WORK_DIR", "WORK_ROWS_DIR",
           "run_curate", "process_batch", "finalize_kept", "finalize_rejects", "build_manifest", "checksum_inputs",
           "DROP_SCHEMA"]
