"""The input ledger and discovery of ``mm refresh``: idempotent per snapshot; new / changed /
unchanged inputs, an input whose size and mtime match is not re-read; an empty source is fine.

Run: ``.venv/bin/pytest tests/test_ledger.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

from test_refresh import _jpeg, _tar

from pipelines.ledger import discover, read_ledger, write_ledger_rows


def test_ledger_rows_are_replaced_per_snapshot(tmp_path):
    rows = [{"uri": "/a.tar", "kind": "tar", "size": 3, "mtime_ns": 1, "checksum": "c1"}]
    write_ledger_rows(tmp_path, rows, "20260101T0000")
    write_ledger_rows(tmp_path, rows, "20260101T0000")  # a rerun of the same commit
    write_ledger_rows(tmp_path, [{**rows[0], "checksum": "c2"}], "20260102T0000")
    t = read_ledger(tmp_path)
    assert t.num_rows == 2
    assert t.column("snapshot").to_pylist() == ["20260101T0000", "20260102T0000"]
    assert read_ledger(tmp_path / "missing").num_rows == 0


def test_discover_new_changed_unchanged(tmp_path, ray_session):
    src = tmp_path / "incoming"
    a = _tar(src / "a.tar", {"0.jpg": _jpeg(1), "0.txt": b"a red square"})
    b = _tar(src / "b.tar", {"0.jpg": _jpeg(2), "0.txt": b"a blue circle"})
    first = discover([str(src)], read_ledger(tmp_path))
    assert sorted(Path(r["uri"]).name for r in first["new"]) == ["a.tar", "b.tar"]
    assert all(r["checksum"].startswith("blake2b") for r in first["new"])
    write_ledger_rows(tmp_path, first["new"], "s1")

    again = discover([str(src)], read_ledger(tmp_path))
    assert again["new"] == again["changed"] == [] and again["unchanged"] == 2

    # Same size and mtime as the ledger says: not re-read (a bogus ledger checksum is believed).
    ledger = read_ledger(tmp_path).to_pylist()
    for r in ledger:
        r["checksum"] = "bogus"
    write_ledger_rows(tmp_path, ledger, "s1")
    assert discover([str(src)], read_ledger(tmp_path))["unchanged"] == 2

    _tar(a, {"0.jpg": _jpeg(3), "0.txt": b"a green star!"})  # rewritten: new mtime, new bytes
    st = b.stat()
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched only: same bytes
    ledger = [r for r in read_ledger(tmp_path).to_pylist()]
    for r, f in zip(ledger, first["new"]):
        r["checksum"] = f["checksum"]
    write_ledger_rows(tmp_path, ledger, "s1")
    found = discover([str(src)], read_ledger(tmp_path))
    assert [Path(r["uri"]).name for r in found["changed"]] == ["a.tar"]
    assert found["new"] == [] and found["unchanged"] == 1


def test_discover_tolerates_an_empty_source(tmp_path):
    (tmp_path / "incoming").mkdir()
    assert discover([str(tmp_path / "incoming")], read_ledger(tmp_path)) == {"new": [], "changed": [],
                                                                                   "unchanged": 0}
