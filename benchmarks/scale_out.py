"""The 14 classifier steps of a replica one at a time on one host, then on a local two-node Ray cluster with two
GPUs declared (``CXR_EXECUTOR=ray``, dagster-ray's executor, the ``gpu`` pool's limit set to 2 as a deployment
sets it), with the same tiny recipe and the same inputs.

    python benchmarks/scale_out.py [--patients 40] [--epochs 1] [--size 32]

The inputs (manifest, shards) are built once on one host and not timed. One host: the 14 partitions one after
another, each a ``dagster asset materialize`` (the run process, the step in process). Cluster: all 14 launched
at once, each its own run; Ray places each step on a node with a free GPU and the rest wait. Reported: wall
times, how many steps computed at once at most (STEP_START..STEP_SUCCESS spans), which nodes ran steps.

On a 2-core machine each step gets one thread, and the ratio shows scheduling (two steps overlapping, process
starts hidden behind computation), not a GPU speed-up: nothing here computes on a GPU.

Last line: ``scale-out: 14 classifier steps on 2 nodes, 2 GPUs: at most <k> at once, <both nodes used|...>,
<s> s vs <s> s one at a time``
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cxr_pipeline.local_ray import classifier_inputs, materialize_cmd, set_gpu_pool, two_node_cluster

ROOT = Path(__file__).resolve().parent.parent


def materialize(env: dict, partition: str) -> None:
    done = subprocess.run(materialize_cmd(partition), env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise SystemExit(f"{partition}: {done.stderr[-3000:]}")


def spans(home: Path, partitions: list[str], since: float) -> dict[str, tuple[float, float, str]]:
    """Each partition's latest classifier step after ``since``: (start, end, node)."""
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    out = {}
    with dg.DagsterInstance.get() as instance:
        for p in partitions:
            (rec,) = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("classifier"), asset_partitions=[p]), limit=1
            ).records
            run_id = rec.event_log_entry.run_id
            events = instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS})
            t = {e.dagster_event_type: e.timestamp for e in events}
            start, end = t[dg.DagsterEventType.STEP_START], t[dg.DagsterEventType.STEP_SUCCESS]
            assert start >= since, f"{p}: no new materialization"
            out[p] = (start, end, rec.asset_materialization.metadata["node"].value)
    return out


def at_most(spans_: dict) -> int:
    return max(sum(1 for s, e, _ in spans_.values() if s <= t < e) for t, _, _ in spans_.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()

    from cxr_pipeline.data.synthetic import SynthConfig, generate
    from cxr_pipeline.labels import SLUGS
    from cxr_pipeline.settings import Paths

    work = Path(tempfile.mkdtemp(prefix="scale_out"))
    raw, home = work / "raw", work / "home"
    generate(SynthConfig(patients=args.patients, seed=7, source_rows=96), raw)
    layout = Paths(home=home, raw=raw)
    recipe = {
        "manifest": {"views": [], "one_image_per_subject": False},
        "image_shards": {"sizes": [args.size], "workers": 1},
        "classifier": {"size": args.size, "epochs": args.epochs, "batch_size": 16, "accumulation": 1, "bootstrap": 20},
        "compute": {"threads": 1},
    }
    env = {**classifier_inputs(layout, recipe), "CXR_EXECUTOR": "in_process"}
    partitions = list(SLUGS)

    t0 = time.time()
    for p in partitions:
        materialize(env, p)
    one_host = time.time() - t0
    host_spans = spans(home, partitions, t0)
    print(f"one host, one at a time: {one_host:.0f} s, at most {at_most(host_spans)} at once", flush=True)

    with two_node_cluster() as cluster:
        on_ray = {**env, **cluster.env, "CXR_HOME": str(home), "CXR_EXECUTOR": "ray", "RAY_ADDRESS": cluster.address}
        set_gpu_pool(on_ray, 2)
        nodes = set(cluster.node_ids().values())
        t0 = time.time()
        with ThreadPoolExecutor(len(partitions)) as pool:
            list(pool.map(lambda p: materialize(on_ray, p), partitions))
        cluster_s = time.time() - t0
    ray_spans = spans(home, partitions, t0)
    used = {node for _, _, node in ray_spans.values()}
    both = "both nodes used" if used == nodes else f"nodes used: {len(used & nodes)} of {len(nodes)}"
    print(f"cluster: {cluster_s:.0f} s; steps per node: {[sum(1 for *_, n in ray_spans.values() if n == x) for x in sorted(nodes)]}")
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"scale-out: {len(partitions)} classifier steps on 2 nodes, 2 GPUs: at most {at_most(ray_spans)} at once, {both}, "
        f"{cluster_s:.0f} s vs {one_host:.0f} s one at a time"
    )


if __name__ == "__main__":
    main()
