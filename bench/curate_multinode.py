"""One curate plan spread over several nodes: cluster.yaml's node types under Ray's
``fake_multinode`` provider (tests/test_autoscaling.py's ``fake_config``), with ``cpu_curate`` held
at ``--workers`` nodes of 1 CPU each and a head that advertises no CPU, as in cluster.yaml. The
curate job is submitted as on the real cluster (``ray job submit --entrypoint-resources
'{"curation": 1}'``), then Ray's state API says on which node every task of that job ran.

What it shows: the tasks of one Ray Data plan (reads, the process map, the dedup and write
passes) land on every ``cpu_curate`` node, none on the head. It is a placement check, not a
speed figure: the fake nodes share this machine's cores.

    python bench/curate_multinode.py --images 2000 --workers 3 > bench/results/curate_multinode.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=3, help="cpu_curate nodes (1 CPU each)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    args = p.parse_args()

    from ray.job_submission import JobStatus
    from ray.util.state import list_tasks
    from test_autoscaling import _kind, _nodes, fake_config
    from test_job_submit import LocalCluster, submit

    from pipelines.demo_corpus import generate_demo_corpus

    work = Path(args.work or tempfile.mkdtemp(prefix="mm-multinode-"))
    demo = generate_demo_corpus(work / "demo", n_images=args.images, n_videos=2, seed=11)
    head_cpus = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]["ray.head.default"][
        "resources"]["CPU"]
    cluster = LocalCluster(num_cpus=head_cpus, env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    cfg = fake_config(cluster.gcs_address, max_cpu_workers=args.workers)
    cfg["available_node_types"]["cpu_curate"]["min_workers"] = args.workers
    cluster.autoscaling_config = cfg
    cluster.start()
    try:
        t0 = time.time()
        while True:  # the min_workers nodes come up before the job, so the plan sees them all
            kinds = {n["id"]: _kind(n) for n in _nodes(cluster.gcs_address)}
            if list(kinds.values()).count("cpu_curate") >= args.workers:
                break
            if time.time() - t0 > 300:
                raise SystemExit(f"only {kinds} after 300 s")
            time.sleep(2)
        out = work / "corpus"
        sub = submit(cluster, "multinode-curate",
                     ["python", "-m", "jobs.curate", *demo["image_sources"], "--out", str(out),
                      "--set", "execution.node_labels={mm.io/role: curation}"],
                     ["--entrypoint-resources", json.dumps({"curation": 1})], working_dir=f"local://{ROOT}")
        if sub.returncode != 0:
            raise SystemExit(sub.stdout + sub.stderr)
        t1 = time.time()
        status = cluster.wait_job("multinode-curate", timeout_s=1800)
        wall = time.time() - t1
        if status != JobStatus.SUCCEEDED.value:
            raise SystemExit(cluster.logs("multinode-curate")[-3000:])
        job_id = cluster.client().get_job_info("multinode-curate").job_id
        tasks = list_tasks(address=cluster.dashboard_url, filters=[("job_id", "=", job_id)], limit=10_000,
                           detail=True, raise_on_missing_output=False)
        per_node: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for t in tasks:
            # fake_multinode ids share their first bytes (ffffffff...): the tail tells the nodes apart
            node = kinds.get(t.node_id, "?") + ":" + (t.node_id or "none")[-8:]
            per_node[node][t.name] += 1
        stats = json.loads((out / "stats.json").read_text())

        def work(c: collections.Counter) -> int:  # the plan's tasks, not Ray Data's bookkeeping actors' calls
            return sum(v for k, v in c.items() if not k.startswith("_") and not k.endswith("__init__")
                       and ":" not in k)

        print(json.dumps({
            "images": args.images, "cpu_curate_nodes": args.workers, "job_status": status,
            "job_wall_s": round(wall, 1), "kept": stats.get("kept"), "tasks": len(tasks),
            "plan_tasks_per_node": {k: work(c) for k, c in sorted(per_node.items()) if work(c)},
            "cpu_curate_nodes_with_plan_tasks": sum(1 for k, c in per_node.items()
                                                    if k.startswith("cpu_curate") and work(c)),
            "plan_tasks_on_head": sum(work(c) for k, c in per_node.items() if k.startswith("head")),
            "per_node": {k: dict(sorted(c.items())) for k, c in sorted(per_node.items())},
        }, indent=1))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
