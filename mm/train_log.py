"""What a training run reports (rank 0 of the Ray Train workers): ``RUN/metrics.jsonl``, one
progress line per logged step, optional TensorBoard / MLflow.

    mlog = MetricsLog(run_dir, cfg.train, start_step)   # trims lines an earlier attempt logged past it
    mlog.write({"step": 10, "loss": 1.2, ...}); mlog.close()
    lines = read_metrics(run_dir / "metrics.jsonl")

Tested in tests/test_train.py.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from core.storage import is_uri, join, read_bytes, write_bytes

log = logging.getLogger(__name__)


def say(line: str) -> None:
    """One line for the user from a Ray Train worker, shown once on the driver. Train's workers
    patch ``print`` to log through the root logger *and* echo to stdout, and Ray forwards both
    streams, so a ``print`` showed every line twice: log it when the root logger has a handler
    (Train's console handler), print it otherwise."""
    if logging.getLogger().handlers:
        log.info(line)
    else:
        print(line, flush=True)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The lines of a run's metrics.jsonl, at a path or a URI ([] before the first logged step)."""
    data = read_bytes(str(path))
    if data is None:
        return []
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


class MetricsLog:
    """rank 0: metrics.jsonl, a progress line with ETA, optional TensorBoard / MLflow."""

    def __init__(self, run_dir: str, t, start_step: int) -> None:  # t: the run's mm.train.TrainConfig
        self.path = join(run_dir, "metrics.jsonl")  # a path or a URI
        self.local = not is_uri(self.path)
        self.t = t
        # Lines past the checkpoint we resume from were logged by an attempt that died: the
        # resumed run writes those steps again.
        self.lines = [json.dumps(m) + "\n" for m in read_metrics(self.path) if m["step"] <= start_step]
        write_bytes(self.path, "".join(self.lines).encode("utf-8"))
        self.start_step, self.t0 = start_step, time.time()
        self.tb = self.mlflow = None
        if t.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if t.mlflow_tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(t.mlflow_tracking_uri)
            mlflow.start_run(run_name=Path(run_dir).name)
            self.mlflow = mlflow

    def write(self, m: dict) -> None:
        self.lines.append(json.dumps(m) + "\n")
        if self.local:
            with open(self.path, "a") as f:
                f.write(self.lines[-1])
        else:  # an object store has no append: the file is put whole (one small PUT per logged step)
            write_bytes(self.path, "".join(self.lines).encode("utf-8"))
        done = m["step"] - self.start_step
        eta = (time.time() - self.t0) / max(1, done) * (self.t.max_steps - m["step"])
        parts = " ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in m.items() if k.startswith("loss/"))
        say(f"step {m['step']}/{self.t.max_steps} loss {m['loss']:.4f} ({parts}) lr {m['lr']:.2e} "
            f"{m['samples_per_s']:.1f} samples/s data-wait {100 * m['data_wait_frac']:.1f}% "
            f"eta {int(eta) // 60}m{int(eta) % 60:02d}s")
        scalars = {k: v for k, v in m.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, m["step"])
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=m["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


__all__ = ["MetricsLog", "read_metrics", "say"]
