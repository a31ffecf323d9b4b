"""``fit(init=URI)`` on a cluster without a shared disk: the workers get the URI and fetch the
model themselves, never the driver's fetched copy (a path under the driver's ~/.cache/mm that
other nodes do not have). Real S3 API server: moto_server (tests/s3.py); tests/test_resume.py
covers the same worker path with a file:// URI, which core.storage reads in place (no fetch).

    .venv/bin/pytest tests/test_train_init_s3.py -q
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from s3 import s3_server  # noqa: E402,F401

from core.storage import is_uri, upload_dir  # noqa: E402
from mm.checkpoint import save_model  # noqa: E402
from mm.config import FusionConfig, ModelConfig, TextConfig, VisionConfig  # noqa: E402
from mm.models import build_model  # noqa: E402
from mm.train import _build_model  # noqa: E402

CFG = ModelConfig(vision=VisionConfig(image_px=32, patch_px=8, width=32, depth=1, heads=2, max_frames=2),
                  text=TextConfig(width=32, depth=1, heads=2, max_tokens=16), fusion=FusionConfig(depth=0),
                  embed_dim=16)


def test_workers_fetch_an_s3_init_model_on_their_own_node(s3_server, tmp_path, monkeypatch):  # noqa: F811
    torch.manual_seed(3)
    model = build_model(CFG, 40)
    save_model(model, CFG, tmp_path / "pre" / "model", None)
    init = f"{s3_server.bucket('init')}/pre"
    upload_dir(tmp_path / "pre", init)
    # a worker on another node: an empty cache of its own
    monkeypatch.setenv("MM_CACHE_DIR", str(tmp_path / "other-node-cache"))
    got = _build_model(CFG, 40, init, None)
    want = model.state_dict()
    for k, v in got.state_dict().items():
        assert torch.equal(v, want[k]), k
    fetched = list((tmp_path / "other-node-cache").rglob("model.safetensors"))
    assert len(fetched) == 1 and not is_uri(str(fetched[0]))
