"""Source expansion, readers (tar, folder, manifests) and URL download against a local HTTP server."""

from __future__ import annotations

import http.server
import io
import json
import os
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.storage import expand_braces
from pipelines.datasources import read_inputs
from pipelines.download import download_batch, download_chunks
from pipelines.inputs import INPUT_SCHEMA
from pipelines.listing import expand_sources, glob_regex
from pipelines.sources import SourceConfig, webdataset_key


def jpeg(seed: int = 0, w: int = 96, h: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    small = (rng.random((h // 8 + 1, w // 8 + 1, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            t.addfile(info, io.BytesIO(data))
    return path


def records(ds) -> dict[tuple[str, str], dict]:
    return {(r["source"].rsplit("/", 1)[-1], r["key"]): r for r in ds.take_all()}


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("plain") == ["plain"]
    assert expand_braces("x{y}z") == ["x{y}z"]


def test_glob_regex():
    assert glob_regex("/d/*.tar").match("/d/a.tar") and not glob_regex("/d/*.tar").match("/d/x/a.tar")
    assert glob_regex("/d/**/*.tar").match("/d/x/y/a.tar")
    assert glob_regex("/d/s-0[0-1].tar").match("/d/s-01.tar")


def test_webdataset_key():
    assert webdataset_key("dir/0001.jpg") == ("dir/0001", "0001.jpg")
    assert webdataset_key("0001.seg.json") == ("0001", "0001.seg.json")


def test_expand_sources_kinds_and_errors(tmp_path):
    for i in range(3):
        make_tar(tmp_path / "shards" / f"s-{i:03d}.tar", [("a.jpg", b"x"), ("a.txt", b"y")])
    (tmp_path / "shards" / "s-000.parquet").write_bytes(b"img2dataset metadata, ignored")
    assert [f.kind for f in expand_sources([str(tmp_path / "shards")])] == ["tar"] * 3
    assert len(expand_sources([str(tmp_path / "shards" / "s-{000..001}.tar")])) == 2
    assert len(expand_sources([str(tmp_path / "shards" / "*.tar")])) == 3
    assert expand_sources([f"file://{tmp_path}/shards/s-000.tar"])[0].kind == "tar"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.jpg").write_bytes(b"x")
    assert expand_sources([str(tmp_path / "folder")])[0].kind == "folder"
    with pytest.raises(ValueError, match="does not exist"):
        expand_sources([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no inputs"):
        expand_sources([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="no inputs"):
        expand_sources([str(tmp_path / "shards" / "*.zip")])
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match="unknown file type"):
        expand_sources([str(tmp_path / "notes.md")])


@pytest.fixture(scope="module")
def mixed_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    outside = root / "outside"
    outside.mkdir()
    make_tar(root / "shard.tar", [
        ("0001.jpg", jpeg(1)), ("0001.txt", b"a caption"),
        ("0002.jpg", jpeg(2)), ("0002.json", json.dumps({"caption": "json caption", "label": "cat", "w": 3}).encode()),
        ("0003.png", jpeg(3)),                                            # no caption
        ("0004.txt", b"caption without media"),
        ("0005.jpg", jpeg(5)), ("0005.txt", b"with label"), ("0005.cls", b"dog"),
        ("0006.mp4", b"not really a video"), ("0006.txt", b"a clip"), ("0006.srt", b"1\n00:00:00,000 --> 00:00:01,000\nhi\n"),
        ("../../outside/evil.jpg", jpeg(7)), ("../../outside/evil.txt", b"path traversal"),
        ("/tmp/abs_member.jpg", jpeg(8)), ("/tmp/abs_member.txt", b"absolute member"),
        ("sub/0009.jpg", jpeg(9)), ("sub/0009.txt", b"in a subdir"),
    ])
    with tarfile.open(root / "links.tar", "w") as t:
        info = tarfile.TarInfo("0001.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(info)
        data = b"caption of a link"
        info = tarfile.TarInfo("0001.txt")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    good = make_tar(root / "trunc_src.tar", [m for i in range(4) for m in
                                             ((f"{i:04d}.txt", b"x"), (f"{i:04d}.jpg", jpeg(i, 300, 200)))])
    raw = good.read_bytes()
    (root / "truncated.tar").write_bytes(raw[: len(raw) // 2])
    good.unlink()
    make_tar(root / "gz.tar.gz", [("0001.jpg", jpeg(1)), ("0001.txt", b"gzipped")], mode="w:gz")
    folder = root / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(jpeg(11))
    (folder / "a.txt").write_text("folder caption")
    (folder / "sub" / "b.png").write_bytes(jpeg(12))
    (folder / "sub" / "b.json").write_text(json.dumps({"caption": "json in folder", "label": "bird"}))
    (folder / "c.jpg").write_bytes(jpeg(13))
    (folder / "orphan.txt").write_text("no media")
    (folder / "README.md").write_text("not an input")
    img_dir = root / "imgs"
    img_dir.mkdir()
    (img_dir / "p1.jpg").write_bytes(jpeg(21))
    pq.write_table(pa.table({"caption": ["bytes row", "hf row", None], "jpg": [jpeg(22), None, jpeg(23)],
                             "image": [None, {"bytes": jpeg(24), "path": "x.jpg"}, None]}), root / "bytes.parquet")
    (root / "paths.jsonl").write_text(
        json.dumps({"caption": "path row", "path": "imgs/p1.jpg", "label": "l1"}) + "\n"
        + "{not json\n"
        + json.dumps({"caption": "missing file", "path": "imgs/nope.jpg"}) + "\n")
    (root / "urls.csv").write_text("url,caption\nhttp://127.0.0.1:1/a.jpg,\"a, quoted caption\"\n")
    return root, outside


def test_read_mixed_sources(ray_session, mixed_sources):
    root, outside = mixed_sources
    files = expand_sources([str(root / "shard.tar"), str(root / "links.tar"), str(root / "truncated.tar"),
                            str(root / "gz.tar.gz"), str(root / "folder"), str(root / "bytes.parquet"),
                            str(root / "paths.jsonl"), str(root / "urls.csv")])
    ds = read_inputs(files, SourceConfig())
    assert ds.schema().names == INPUT_SCHEMA.names
    got = records(ds)
    tar = {k: v for (s, k), v in got.items() if s == "shard.tar"}
    assert tar["0001"]["caption_raw"] == "a caption" and tar["0001"]["media"] == jpeg(1)
    assert tar["0002"]["caption_raw"] == "json caption" and json.loads(tar["0002"]["meta"]) == {"label": "cat", "w": 3}
    assert tar["0003"]["error"] == "missing_caption"
    assert tar["0004"]["error"] == "missing_media"
    assert json.loads(tar["0005"]["meta"])["label"] == "dog"
    assert tar["0006"]["media_name"] == "0006.mp4" and json.loads(tar["0006"]["meta"])["subtitles_format"] == "srt"
    assert tar["../../outside/evil"]["caption_raw"] == "path traversal"
    assert tar["/tmp/abs_member"]["media"] == jpeg(8)
    assert tar["sub/0009"]["caption_raw"] == "in a subdir"
    assert list(outside.iterdir()) == [] and not Path("/tmp/abs_member.jpg").exists()  # nothing extracted
    assert got[("links.tar", "0001")]["error"] == "unsupported_member"
    trunc = {k: v for (s, k), v in got.items() if s == "truncated.tar"}
    assert any(v["error"] == "corrupt_shard" for v in trunc.values())
    assert sum(v["error"] is None for v in trunc.values()) >= 1
    assert got[("gz.tar.gz", "0001")]["caption_raw"] == "gzipped"
    assert got[("folder", "a")]["caption_raw"] == "folder caption"
    assert json.loads(got[("folder", "sub/b")]["meta"]) == {"label": "bird"}
    assert got[("folder", "c")]["error"] == "missing_caption"
    assert got[("folder", "orphan")]["error"] == "missing_media"
    assert not any(s == "folder" and k.startswith("README") for s, k in got)
    assert got[("bytes.parquet", "000000000")]["media"] == jpeg(22)
    assert got[("bytes.parquet", "000000001")]["media"] == jpeg(24)  # HF {"bytes", "path"} struct
    assert got[("bytes.parquet", "000000002")]["error"] == "missing_caption"
    assert got[("paths.jsonl", "000000000")]["media"] == jpeg(21)
    assert json.loads(got[("paths.jsonl", "000000000")]["meta"])["label"] == "l1"
    assert got[("paths.jsonl", "000000001")]["error"] == "bad_manifest_row"
    assert got[("paths.jsonl", "000000002")]["error"] == "missing_media"
    row = got[("urls.csv", "000000000")]
    assert row["url"] == "http://127.0.0.1:1/a.jpg" and row["media"] is None and row["caption_raw"] == "a, quoted caption"


# --------------------------------------------------------------------------- download
class _Handler(http.server.BaseHTTPRequestHandler):
    flaky_hits: dict[str, int] = {}

    def log_message(self, *args):
        pass

    def _send(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        if not any(k == "Content-Length" for k, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        p = self.path
        if p == "/good.jpg":
            self._send(200, jpeg(1), [("Content-Type", "image/jpeg")])
        elif p == "/slow.jpg":
            time.sleep(3)
            self._send(200, jpeg(2))
        elif p == "/missing.jpg":
            self._send(404, b"no")
        elif p == "/truncated.jpg":
            body = jpeg(3)
            self._send(200, body[:100], [("Content-Length", str(len(body)))])
            self.wfile.flush()
            self.close_connection = True
        elif p == "/redirect.jpg":
            self._send(302, b"", [("Location", "/good.jpg")])
        elif p == "/noai.jpg":
            self._send(200, jpeg(4), [("X-Robots-Tag", "noai, noimageai")])
        elif p == "/flaky.jpg":
            n = _Handler.flaky_hits.get(p, 0)
            _Handler.flaky_hits[p] = n + 1
            self._send(503 if n == 0 else 200, b"busy" if n == 0 else jpeg(5))
        else:
            self._send(404)


@pytest.fixture(scope="module")
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def url_batch(urls: list[str]) -> pa.Table:
    rows = [{f.name: None for f in INPUT_SCHEMA} | {"source": "m", "key": str(i), "url": u} for i, u in enumerate(urls)]
    return pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)


def test_download_good_slow_404_truncated_redirect_optout_retry(http_server):
    names = ["good", "slow", "missing", "truncated", "redirect", "noai", "flaky"]
    cfg = SourceConfig(download_timeout_s=1.0, download_total_timeout_s=5.0, download_retries=2,
                       download_backoff_s=0.05)
    t0 = time.time()
    out = download_batch(url_batch([f"{http_server}/{n}.jpg" for n in names]), cfg)
    elapsed = time.time() - t0
    got = dict(zip(names, out.to_pylist()))
    assert got["good"]["media"] == jpeg(1) and got["good"]["error"] is None
    assert got["redirect"]["media"] == jpeg(1)
    assert got["flaky"]["media"] == jpeg(5)  # 503, then retried
    assert got["slow"]["error"] == "download_timeout"
    assert got["missing"]["error"] == "http_error" and got["missing"]["error_detail"] == "404"
    assert got["truncated"]["error"] == "download_truncated"
    assert got["noai"]["error"] == "opt_out" and got["noai"]["media"] is None
    assert elapsed < 8  # timeouts bounded, requests concurrent


def test_download_skips_rows_with_media_or_errors(http_server):
    t = url_batch([f"{http_server}/good.jpg", f"{http_server}/good.jpg"])
    t = t.set_column(t.column_names.index("error"), "error", pa.array([None, "missing_caption"]))
    out = download_batch(t, SourceConfig()).to_pylist()
    assert out[0]["media"] == jpeg(1) and out[1]["media"] is None and out[1]["error"] == "missing_caption"


def test_per_host_limit_is_respected(http_server):
    cfg = SourceConfig(download_per_host=2, download_threads=8, download_timeout_s=10, download_total_timeout_s=30)
    t0 = time.time()
    out = download_batch(url_batch([f"{http_server}/slow.jpg"] * 4), cfg)
    assert all(r["error"] is None for r in out.to_pylist())
    assert time.time() - t0 >= 5.5  # 4 slow requests, 2 at a time: two rounds of 3 s


def test_download_chunks_stream_in_order_with_bounded_lookahead(http_server, monkeypatch):
    import pipelines.download as dl

    monkeypatch.setattr(dl, "AHEAD_ROWS", 4)
    cfg = SourceConfig(download_threads=2, download_per_host=2)  # lookahead: max(4, 8 * 2) = 16 rows
    names = ["good", "missing", "redirect", "noai"] * 10
    t = url_batch([f"{http_server}/{n}.jpg" for n in names])
    t = t.set_column(t.column_names.index("error"), "error", pa.array([None] * 39 + ["missing_caption"]))
    chunks = download_chunks(t, cfg, chunk_rows=8)
    first = next(chunks)  # the first chunk comes before the whole batch is fetched
    assert first.num_rows == 8
    rest = list(chunks)
    assert [c.num_rows for c in rest] == [8, 8, 8, 8]
    rows = pa.concat_tables([first, *rest]).to_pylist()
    assert [r["key"] for r in rows] == [str(i) for i in range(40)]
    for name, r in zip(names[:39], rows):
        assert (r["media"] is not None) == (name in ("good", "redirect")), (name, r["error"])
    assert rows[39]["error"] == "missing_caption" and rows[39]["media"] is None


def test_source_config_validation():
    with pytest.raises(ValueError):
        SourceConfig(download_threads=0)
    assert os.environ.get("RAY_ADDRESS") is None
