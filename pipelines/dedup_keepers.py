"""The keeper rule and the drops it produces: which row of a duplicate group stays, what a
drop's ``detail`` says, and the no-chaining walk over a component of verified edges.

Split out of pipelines/dedup.py (which orchestrates the passes and re-exports every name here);
the rule itself is documented there. Tested in tests/test_dedup.py.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.dedup_lsh import row_hash64

DROP_SCHEMA = pa.schema([pa.field("row_id", pa.string()), pa.field("reason", pa.string()),
                         pa.field("keeper", pa.string())])
EVIDENCE_SCHEMA = DROP_SCHEMA.append(pa.field("evidence", pa.string()))

_EXACT_EVIDENCE = {"content_hash": "exact=media", "sample_id": "exact=pair"}


# --------------------------------------------------------------------------- detail of a drop
def drop_details(drops: pa.Table) -> pa.Array:
    """The reject ``detail`` of each drop: its keeper's sample_id, then (with an ``evidence``
    column) a space and the evidence, e.g. ``"9f3c... hamming=3 residual=6.1 limit=22.0"``."""
    keeper = drops.column("keeper")
    if "evidence" not in drops.column_names:
        return keeper.combine_chunks() if isinstance(keeper, pa.ChunkedArray) else keeper
    joined = pc.binary_join_element_wise(keeper, drops.column("evidence"), " ")
    return pc.coalesce(joined, keeper).combine_chunks()


def parse_detail(detail: str | None) -> tuple[str | None, dict[str, str]]:
    """A duplicate reject's ``detail`` → (keeper sample_id, {evidence name: value}). A bare
    keeper id (video clips, older corpora) gives an empty evidence dict."""
    if not detail:
        return None, {}
    keeper, *tokens = detail.split()
    return keeper, dict(t.split("=", 1) if "=" in t else (t, "") for t in tokens)


# --------------------------------------------------------------------------- keeper rule
def keeper_order(t: pa.Table, first: str | None = None) -> np.ndarray:
    """Row indices of ``t`` sorted best-first by the keeper rule (after column ``first``, if given)."""
    prio = t.column("priority") if "priority" in t.column_names else pa.nulls(t.num_rows, pa.int64()).fill_null(0)
    keys = pa.table({
        "first": t.column(first) if first else pa.nulls(t.num_rows, pa.int8()).fill_null(0),
        "prio": prio, "neg_area": pc.negate(t.column("area").cast(pa.int64())),
        "order": pc.binary_join_element_wise(t.column("source"), t.column("key"), "\x00"),
        "sample_id": t.column("sample_id")})
    return pc.sort_indices(keys, sort_keys=[(c, "ascending") for c in keys.column_names]).to_numpy()


def exact_groups(t: pa.Table, key: str) -> pa.Table:
    """Within one shard: every row of a ``key`` group but the keeper → (row_id, duplicate, keeper)."""
    if t.num_rows == 0:
        return EVIDENCE_SCHEMA.empty_table()
    t = t.take(pa.array(keeper_order(t, first=key)))
    codes = pc.dictionary_encode(t.column(key)).combine_chunks().indices.to_numpy(zero_copy_only=False)
    starts = np.r_[True, codes[1:] != codes[:-1]]
    run_start = np.maximum.accumulate(np.where(starts, np.arange(len(codes)), 0))
    dup = np.flatnonzero(~starts)
    return pa.table({"row_id": t.column("row_id").take(pa.array(dup)),
                     "reason": pa.array(["duplicate"] * len(dup), pa.string()),
                     "keeper": t.column("sample_id").take(pa.array(run_start[dup])),
                     "evidence": pa.array([_EXACT_EVIDENCE[key]] * len(dup), pa.string())}, schema=EVIDENCE_SCHEMA)


class UnionFind:
    """Disjoint sets over arbitrary hashable ids, path halving + union by size."""

    def __init__(self):
        self.parent: dict = {}
        self.size: dict = {}

    def find(self, x):
        parent = self.parent
        if x not in parent:
            parent[x], self.size[x] = x, 1
            return x
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, x, y) -> bool:
        rx, ry = self.find(x), self.find(y)
        if rx == ry:
            return False
        if self.size[rx] < self.size[ry]:
            rx, ry = ry, rx
        self.parent[ry] = rx
        self.size[rx] += self.size[ry]
        return True

    def components(self) -> dict:
        groups: dict = {}
        for x in self.parent:
            groups.setdefault(self.find(x), []).append(x)
        return groups


# --------------------------------------------------------------------------- components
def _union(edges: pa.Table) -> tuple[UnionFind, dict[int, dict[int, str]]]:
    """Union-find components and the adjacency of the verified edges, with each edge's evidence."""
    uf = UnionFind()
    adjacent: dict[int, dict[int, str]] = {}
    cols = [edges.column(c).to_numpy().tolist() for c in ("a", "b", "dist")]
    limits = edges.column("limit").to_pylist() if "limit" in edges.column_names else [None] * edges.num_rows
    for x, y, d, s, lim in zip(*cols, edges.column("score").to_pylist(), limits):
        uf.union(x, y)
        evidence = _evidence(d, s, lim)
        adjacent.setdefault(x, {})[y] = evidence
        adjacent.setdefault(y, {})[x] = evidence
    return uf, adjacent


def _evidence(dist: int, score: float | None, limit: float | None = None) -> str:
    if dist < 0:
        return f"jaccard={score:.2f}"
    if score is None or score != score:  # NaN: decided on the hashes alone
        return f"hamming={dist}"
    return f"hamming={dist} residual={score:.1f}" + (f" limit={limit:.1f}" if limit is not None else "")


def component_drops(members: pa.Table | None, graph: tuple[UnionFind, dict[int, dict[int, str]]]) -> pa.Table:
    """Keepers per connected component, without chaining: members are visited in keeper-rule
    order; one with a verified edge to a keeper of its component is dropped in favour of the
    best such keeper, any other becomes a keeper itself. So every dropped row was verified
    against its keeper (A~B~C with A unlike C keeps A and C, drops B)."""
    if members is None or members.num_rows == 0:
        return EVIDENCE_SCHEMA.empty_table()
    uf, adjacent = graph
    members = members.take(pa.array(keeper_order(members)))
    rid = row_hash64(members.column("row_id")).tolist()
    ids, sids = members.column("row_id").to_pylist(), members.column("sample_id").to_pylist()
    rank = {r: i for i, r in enumerate(rid)}
    keepers: set[int] = set()
    out_rows, out_keepers, out_evidence = [], [], []
    for i, r in enumerate(rid):
        near = adjacent.get(r, {})
        best = min((rank[n] for n in near if n in keepers and uf.find(n) == uf.find(r)), default=None)
        if best is None:
            keepers.add(r)
        else:
            out_rows.append(ids[i])
            out_keepers.append(sids[best])
            out_evidence.append(near[rid[best]])
    return pa.table({"row_id": out_rows, "reason": ["near_duplicate"] * len(out_rows), "keeper": out_keepers,
                     "evidence": out_evidence}, schema=EVIDENCE_SCHEMA)
