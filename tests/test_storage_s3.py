"""core.storage whole-file reads on a real S3 API server (moto_server, tests/s3.py).

    .venv/bin/pytest tests/test_storage_s3.py -q

``read_bytes`` is how metrics.jsonl, manifests, train_state.json and every small JSON of a run
are read from a store. Each read must return one version of the object whole, even while a
writer replaces it (a rank-0 worker re-PUTs metrics.jsonl at every logged step; a rerun rewrites
attempt/pointer objects). Before the fix it asked for the size (HEAD) and then read that many
bytes (ranged GETs): an object replaced in between came back cut to the old size or mixed.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from s3 import s3_server  # noqa: E402,F401

from core.storage import read_bytes, read_json, write_bytes  # noqa: E402


def test_read_bytes_on_s3_returns_whole_objects_or_none(s3_server):  # noqa: F811
    root = s3_server.bucket("read")
    assert read_bytes(f"{root}/missing.json") is None
    assert read_json(f"{root}/missing.json") is None
    write_bytes(f"{root}/dir/a.json", b'{"x": 1}')
    assert read_bytes(f"{root}/dir") is None  # a "directory" (a prefix) is not a file
    assert read_json(f"{root}/dir/a.json") == {"x": 1}
    big = bytes(range(256)) * 40_000  # 10 MB: more than one ranged read in pyarrow's stream
    write_bytes(f"{root}/big.bin", big)
    assert read_bytes(f"{root}/big.bin") == big
    assert read_bytes("s3://no-such-bucket-xyz/a.json") is None  # as before: "no such file"


def test_read_bytes_never_sees_a_torn_object_while_it_is_replaced(s3_server):  # noqa: F811
    """A reader polling an object that a writer keeps replacing with a shorter or a longer
    version sees only whole versions (the race is real, not simulated: moto serves each GET
    from the object current at that moment)."""
    uri = f"{s3_server.bucket('race')}/metrics.jsonl"
    short, long = b'{"step": 2}\n' * 50, b'{"step": 4, "loss": 1.25}\n' * 400
    write_bytes(uri, short)
    seen, bad, stop = 0, [], threading.Event()

    def reader():
        nonlocal seen
        while not stop.is_set():
            got = read_bytes(uri)
            seen += 1
            if got not in (short, long):
                bad.append(len(got) if got is not None else None)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(150):
            write_bytes(uri, long if i % 2 == 0 else short)
    finally:
        stop.set()
        t.join()
    assert seen > 20, seen
    assert not bad, f"{len(bad)} of {seen} reads were torn (sizes {sorted(set(bad))[:5]}, want {len(short)} or {len(long)})"
