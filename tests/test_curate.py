"""``mm curate`` end to end on a mixed corpus (tar shards, folder, manifests, URLs) with planted faults."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.curate import main
from pipelines.dedup import parse_detail
from pipelines.schema import IMAGE_SCHEMA, REJECT_SCHEMA


def photo(seed: int, w: int = 160, h: int = 120) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.random((h // 12 + 2, w // 12 + 2, 3))
    base = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    return np.clip(base + rng.normal(0, 5, base.shape), 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def add(t: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """img2dataset-style shards + folder + parquet/jsonl manifests; expected outcome per input."""
    root = tmp_path_factory.mktemp("corpus")
    expect: dict[tuple[str, str], str] = {}  # (source file name, key) -> "kept" or reject reason
    (root / "shards").mkdir()
    for s in range(2):
        with tarfile.open(root / "shards" / f"{s:05d}.tar", "w") as t:
            for i in range(12):
                key = f"{s:05d}{i:04d}"
                add(t, f"{key}.jpg", encode(photo(100 * s + i)))
                add(t, f"{key}.txt", f"a photo number {i} from shard {s}".encode())
                add(t, f"{key}.json", json.dumps({"key": key, "status": "success", "width": 160}).encode())
                expect[(f"{s:05d}.tar", key)] = "kept"
    with tarfile.open(root / "shards" / "00002.tar", "w") as t:
        add(t, "png_copy.png", encode(photo(3), "PNG"))  # the source of 000000003.jpg, lossless: a near dup
        add(t, "png_copy.txt", b"same picture stored again")
        add(t, "near_dup.jpg", encode(np.asarray(Image.fromarray(photo(5)).resize((140, 105))), quality=40))
        add(t, "near_dup.txt", b"a smaller lower quality copy")
        add(t, "corrupt.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg \xff\xd9")
        add(t, "corrupt.txt", b"corrupt bytes")
        add(t, "truncated.jpg", encode(photo(40))[:300])
        add(t, "truncated.txt", b"cut in half")
        add(t, "empty.jpg", b"")
        add(t, "empty.txt", b"zero bytes")
        add(t, "badcap.jpg", encode(photo(41)))
        add(t, "badcap.txt", b"DSC_0042.JPG")
        add(t, "nocap.jpg", encode(photo(42)))
        add(t, "../escape.jpg", encode(photo(43)))
        add(t, "../escape.txt", b"member name tries to leave the folder")
    expect.update({("00002.tar", "near_dup"): "near_duplicate", ("00002.tar", "corrupt"): "decode_error",
                   ("00002.tar", "truncated"): "truncated", ("00002.tar", "empty"): "empty_file",
                   ("00002.tar", "badcap"): "boilerplate_caption", ("00002.tar", "nocap"): "missing_caption",
                   ("00002.tar", "../escape"): "kept", ("00002.tar", "png_copy"): "near_duplicate"})
    folder = root / "folder"
    folder.mkdir()
    for i in range(4):
        (folder / f"f{i}.png").write_bytes(encode(photo(500 + i), "PNG"))
        (folder / f"f{i}.json").write_text(json.dumps({"caption": f"folder image {i}", "label": f"class{i % 2}"}))
        expect[("folder", f"f{i}")] = "kept"
    # lossless re-encode of f0's pixels: an exact duplicate of f0 (decoded pixels equal)
    (folder / "f0_copy.webp").write_bytes(encode(photo(500), "WEBP", lossless=True))
    (folder / "f0_copy.txt").write_text("another caption for the same pixels")
    expect[("folder", "f0_copy")] = "duplicate"
    (folder / "lonely.txt").write_text("a caption whose image is missing")
    expect[("folder", "lonely")] = "missing_media"
    pq.write_table(pa.table({"caption": ["manifest bytes row", "a manifest row with bad bytes"],
                             "jpg": [encode(photo(600)), b"nope"]}), root / "rows.parquet")
    expect[("rows.parquet", "000000000")] = "kept"
    expect[("rows.parquet", "000000001")] = "decode_error"
    imgs = root / "imgs"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(encode(photo(700)))
    (root / "paths.jsonl").write_text(json.dumps({"path": "imgs/a.jpg", "caption": "from a path", "label": "x"}) + "\n"
                                      + json.dumps({"path": "imgs/missing.jpg", "caption": "gone"}) + "\n")
    expect[("paths.jsonl", "000000000")] = "kept"
    expect[("paths.jsonl", "000000001")] = "missing_media"
    srcs = [str(root / "shards" / "{00000..00002}.tar"), str(folder), str(root / "rows.parquet"),
            str(root / "paths.jsonl")]
    return root, srcs, expect


def read_out(out: Path) -> tuple[pa.Table, pa.Table, dict]:
    return pq.read_table(out / "data"), pq.read_table(out / "rejects"), json.loads((out / "stats.json").read_text())


def name_key(source: str, key: str) -> tuple[str, str]:
    return source.rstrip("/").rsplit("/", 1)[-1], key


@pytest.fixture(scope="module")
def curated(ray_session, corpus, tmp_path_factory):
    root, srcs, expect = corpus
    out = tmp_path_factory.mktemp("out") / "curated"
    assert main([*srcs, "--out", str(out), "--set", "images.image_px=64", "--set", "output.rows_per_file=10",
                 "--set", "tokenizer.vocab_size=300"]) == 0
    return out, expect


def test_every_input_exactly_once_with_expected_outcome(curated):
    out, expect = curated
    data, rejects, stats = read_out(out)
    kept = [name_key(s, k) for s, k in zip(data.column("source").to_pylist(), data.column("key").to_pylist())]
    rej = {name_key(r["source"], r["key"]): r for r in rejects.to_pylist()}
    assert len(kept) == len(set(kept)) and len(rej) == rejects.num_rows
    assert not set(kept) & set(rej)
    assert set(kept) | set(rej) == set(expect)
    got = {**{k: "kept" for k in kept}, **{k: r["reason"] for k, r in rej.items()}}
    assert got == expect
    assert stats["inputs"] == len(expect) == stats["kept"] + sum(stats["rejected"].values())
    assert stats["invariant_ok"] is True
    assert stats["rejected"]["near_duplicate"] == 2 and stats["rejected"]["duplicate"] == 1


def test_duplicates_name_their_keeper(curated):
    out, _ = curated
    data, rejects, _ = read_out(out)
    by_key = {name_key(s, k): sid for s, k, sid in zip(data.column("source").to_pylist(), data.column("key").to_pylist(),
                                                       data.column("sample_id").to_pylist())}
    rej = {name_key(r["source"], r["key"]): r for r in rejects.to_pylist()}
    # detail: the keeper's sample_id, then the evidence that decided the drop (name=value tokens)
    keeper, evidence = parse_detail(rej[("00002.tar", "near_dup")]["detail"])
    assert keeper == by_key[("00000.tar", "000000005")]
    assert set(evidence) == {"hamming", "residual", "limit"}
    assert 0 <= int(evidence["hamming"]) <= 10 and float(evidence["residual"]) <= float(evidence["limit"])
    assert rej[("00002.tar", "near_dup")]["detail"].split()[0] == keeper  # the first token is the keeper
    assert parse_detail(rej[("folder", "f0_copy")]["detail"]) == (by_key[("folder", "f0")], {"exact": "media"})
    assert rej[("00002.tar", "near_dup")]["stage"] == "dedup"


def test_output_schema_files_tokenizer_manifest(curated):
    out, _ = curated
    files = sorted((out / "data").glob("*.parquet"))
    assert files and all(pq.read_metadata(f).num_rows <= 10 for f in files)
    data = pq.read_table(out / "data")
    assert data.schema.equals(IMAGE_SCHEMA, check_metadata=False)
    assert pq.read_table(out / "rejects").schema.equals(REJECT_SCHEMA, check_metadata=False)
    row = data.to_pylist()[0]
    im = Image.open(io.BytesIO(row["image"]))
    assert im.format == "JPEG" and min(im.size) == 64 and im.size == (row["width"], row["height"])
    labels = {name_key(s, k): lab for s, k, lab in zip(data.column("source").to_pylist(),
                                                       data.column("key").to_pylist(), data.column("label").to_pylist())}
    assert labels[("folder", "f1")] == "class1" and labels[("paths.jsonl", "000000000")] == "x"
    assert set(data.column("split").to_pylist()) <= {"train", "val"}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    ids = data.column("input_ids").to_pylist()
    assert all(i[0] == tok.cls_token_id and i[-1] == tok.sep_token_id and len(i) <= 32 for i in ids)
    assert tok(data.column("caption")[0].as_py())["input_ids"][:32] == ids[0][:32]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"inputs", "config", "code_version", "time"} <= set(manifest)
    assert all(i["checksum"] and i["size"] > 0 for i in manifest["inputs"])
    assert manifest["config"]["images"]["image_px"] == 64
    stats = json.loads((out / "stats.json").read_text())
    assert sum(stats["histograms"]["caption_words"]["counts"]) == stats["kept"]
    assert not (out / "_work").exists()
    assert not (out.parent / "escape.jpg").exists()


def test_rerun_gives_same_rows(curated, corpus, tmp_path):
    out, _ = curated
    _, srcs, _ = corpus
    again = tmp_path / "again"
    (again / "data").mkdir(parents=True)
    (again / "data" / "stale.parquet").write_bytes(b"left by an interrupted run")
    (again / "_work").mkdir()
    assert main([*srcs, "--out", str(again), "--set", "images.image_px=64", "--set", "output.rows_per_file=10",
                 "--set", "tokenizer.vocab_size=300"]) == 0
    cols = ["sample_id", "source", "key", "caption", "phash", "input_ids", "split", "image"]
    a = pq.read_table(out / "data", columns=cols).sort_by("sample_id")
    b = pq.read_table(again / "data", columns=cols).sort_by("sample_id")
    assert a.equals(b)
    ra = pq.read_table(out / "rejects").sort_by([("source", "ascending"), ("key", "ascending")])
    rb = pq.read_table(again / "rejects").sort_by([("source", "ascending"), ("key", "ascending")])
    assert ra.equals(rb)


@pytest.mark.parametrize("args,msg", [
    (["{root}/missing", "--out", "{out}"], "does not exist"),
    (["{root}/emptydir", "--out", "{out}"], "no inputs"),
    (["{root}/folder", "--out", "{out}", "--set", "images.nope=1"], "unknown config key 'images.nope'"),
    (["{root}/folder", "--out", "{out}", "--set", "dedup.exact=maybe"], "valid choices"),
    (["{root}/folder", "--out", "{out}", "--config", "{root}/bad.yaml"], "not valid YAML"),
    (["{root}/folder", "--out", "{root}/afile.txt"], "is a file"),
])
def test_usage_errors_exit_2_and_write_nothing(corpus, tmp_path, cli_errors, args, msg):
    root = corpus[0]
    (root / "emptydir").mkdir(exist_ok=True)
    (root / "bad.yaml").write_text("images: [unclosed\n")
    (root / "afile.txt").write_text("x")
    out = tmp_path / "never"
    argv = [a.format(root=root, out=out) for a in args]
    assert main(argv) == 2
    err = cli_errors()
    assert len(err) == 1 and msg in err[0]
    assert not out.exists()


def test_demo_corpus_planted_faults(ray_session, tmp_path):
    demo = pytest.importorskip("pipelines.demo_corpus")
    summary = demo.generate_demo_corpus(tmp_path / "demo", n_images=120, n_videos=2, seed=1)
    out = tmp_path / "out"
    assert main([*summary["image_sources"], "--out", str(out), "--set", "tokenizer.vocab_size=300"]) == 0
    data, rejects, stats = read_out(out)
    assert stats["invariant_ok"] is True
    assert data.schema.equals(IMAGE_SCHEMA, check_metadata=False)
    kept_ids = dict(zip(data.column("key").to_pylist(), data.column("sample_id").to_pylist()))
    rej = {r["key"]: r for r in rejects.to_pylist()}
    planted = summary["planted"]
    for kind, reason in (("exact_duplicates", "duplicate"), ("near_duplicates", "near_duplicate")):
        for dup, orig in planted[kind]:
            # one of the pair is kept; the keeper rule (largest resolution, then earliest) may keep
            # an enlarged copy and drop the original: the other one names the keeper
            (gone, kept), = [(a, b) for a, b in ((dup, orig), (orig, dup)) if a in rej and b in kept_ids]
            assert rej[gone]["reason"] in (reason, "duplicate"), (gone, rej[gone])
            assert parse_detail(rej[gone]["detail"])[0] == kept_ids[kept]
    for item in planted["corrupt_media"]:
        key = item[0] if isinstance(item, (list, tuple)) else item
        assert key in rej and rej[key]["stage"] in ("read", "image")
    near = [r for r in rej.values() if r["reason"] == "near_duplicate"]
    planted_near = {k for kind in ("near_duplicates", "exact_duplicates") for p in planted[kind] for k in p}
    assert all(r["key"] in planted_near for r in near), "a clean distinct sample was dropped as a near duplicate"


class _ImageServer:
    """Serves good, 404, opted-out, truncated and redirecting images on 127.0.0.1."""

    def __init__(self):
        import http.server
        import threading

        images = {f"/img{i}.jpg": encode(photo(900 + i)) for i in range(5)}

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                body, code, headers = images.get(self.path, b""), 200, {}
                if self.path == "/missing.jpg":
                    code = 404
                elif self.path == "/noai.jpg":
                    body, headers = images["/img0.jpg"], {"X-Robots-Tag": "noimageai"}
                elif self.path == "/redirect.jpg":
                    code, headers = 301, {"Location": "/img1.jpg"}
                elif self.path == "/truncated.jpg":
                    body, headers = images["/img2.jpg"][:200], {"Content-Length": str(len(images["/img2.jpg"]))}
                self.send_response(code)
                headers.setdefault("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def test_url_manifest_downloaded_in_the_plan(ray_session, tmp_path):
    srv = _ImageServer()
    names = ["img0", "img3", "img4", "missing", "noai", "redirect", "truncated"]
    lines = ["url,caption"] + [f"{srv.url}/{n}.jpg,a downloaded picture called {n}" for n in names]
    (tmp_path / "urls.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    try:
        assert main([str(tmp_path / "urls.csv"), "--out", str(out), "--set", "sources.download_timeout_s=5",
                     "--set", "sources.download_retries=0", "--set", "tokenizer.vocab_size=100"]) == 0
    finally:
        srv.server.shutdown()
    data, rejects, stats = read_out(out)
    kept = {int(k) for k in data.column("key").to_pylist()}
    reasons = {int(r["key"]): r["reason"] for r in rejects.to_pylist()}
    assert kept == {0, 1, 2, 5}
    assert reasons == {3: "http_error", 4: "opt_out", 6: "download_truncated"}
    assert stats["invariant_ok"] is True
