"""The promotion gate of ``mm refresh``: a candidate model against the promoted one on a held-out set.

    value = heldout_metric(run, corpus / "heldout", eval_cfg, gate)    # RUN/heldout/eval.json, cached
    action, why = decide(candidate=0.61, current=0.62, current_run="models/run-…", gate=gate)

Both models are evaluated on the same fixed held-out corpus (``evaluate_run`` on its one split,
the gate task only); the result is kept in ``RUN/heldout/eval.json`` (with ``report.html``) and
reused while the held-out set's manifest is unchanged, so the promoted model is evaluated once
per held-out version. The candidate is promoted when ``gate.metric`` is no worse than the
promoted model's by more than ``gate.tolerance`` (absolute; higher is better), or when there is
no promoted model yet; otherwise it is held, and the reason says by how much.

Tested in tests/test_refresh.py (the decisions, and the three-refresh story).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core import lineage as L
from core.storage import is_local, join, write_bytes
from jobs.stages import StageFailed, stage_errors


@dataclass(frozen=True)
class GateConfig:
    task: Literal["retrieval", "zeroshot"] = "retrieval"
    # A key of eval.json's metrics[task]; higher is better. ``{media}`` is the held-out corpus's
    # modality ("image" or "video"), so one default serves image and video refreshes.
    metric: str = "{media}_retrieval_recall@5"
    tolerance: float = 0.02                    # absolute: promote if new >= current - tolerance


def _evaluate(run: str | os.PathLike, heldout: str | os.PathLike, eval_cfg, task: str) -> dict:
    """``task``'s evaluation of ``run`` on ``heldout``, cached per held-out version (Ray is up).
    A run on an object store is evaluated through a local view of its model (jobs/evaluate.py)
    and its ``heldout/`` files are put beside it on the store."""
    from jobs.evaluate import local_run_view
    from mm.evaluate import evaluate_run, write_eval
    from mm.report import write_report

    out = join(run, "heldout", "eval.json")
    ref = L.manifest_ref(heldout)
    cached = L.read_json(out)
    if isinstance(cached, dict) and cached.get("heldout_manifest_sha256") == ref["manifest_sha256"]:
        return cached
    with tempfile.TemporaryDirectory(prefix="mm-gate-") as scratch:
        local_out = Path(out) if is_local(out) else Path(scratch) / "heldout" / "eval.json"
        with stage_errors(f"evaluate of {run}"):
            result = evaluate_run(local_run_view(str(run), Path(scratch)), str(heldout), eval_cfg, tasks=(task,))
        write_report(write_eval(result, local_out).parent, eval_path=local_out)
        result = json.loads(local_out.read_text())
        result["heldout_manifest_sha256"] = ref["manifest_sha256"]
        L.write_json_atomic(local_out, result)
        if not is_local(out):
            for f in sorted(local_out.parent.iterdir()):
                write_bytes(join(run, "heldout", f.name), f.read_bytes())
    return result


def metric_name(gate: GateConfig, modality: str) -> str:
    """``gate.metric`` with ``{media}`` resolved for a corpus of ``modality``."""
    return gate.metric.replace("{media}", "video" if modality == "video" else "image")


def heldout_metric(run: str | os.PathLike, heldout: str | os.PathLike, eval_cfg, gate: GateConfig) -> float:
    """The gate metric of ``run`` (a path or URI) on the held-out set."""
    result = _evaluate(run, heldout, eval_cfg, gate.task)
    modality = (L.read_json(join(heldout, "stats.json")) or {}).get("modality", "image")
    name = metric_name(gate, modality)
    try:
        return float(result["metrics"][gate.task][name])
    except KeyError:
        have = sorted((result.get("metrics") or {}).get(gate.task, {}))
        raise StageFailed(f"gate metric {gate.task}.{name} not in the evaluation; have: {', '.join(have)}; "
                          f"skipped: {result.get('skipped')}") from None


def decide(candidate: float, current: float | None, current_run: str | None, gate: GateConfig) -> tuple[str, str]:
    """``("promoted" | "held", why)`` for a candidate's metric against the promoted model's."""
    name = f"{gate.task}.{gate.metric}"
    if current is None:
        return "promoted", f"first model: {name} {candidate:.4f}, nothing to compare against"
    if candidate >= current - gate.tolerance:
        return "promoted", f"{name} {candidate:.4f} >= {current:.4f} - tolerance {gate.tolerance} (current)"
    return "held", f"{name} {candidate:.4f} < {current:.4f} - tolerance {gate.tolerance}: kept {current_run}"


__all__ = ["GateConfig", "metric_name", "heldout_metric", "decide"]
