"""`hydra/launcher=ray_cluster`: sweeps on a real two-node Ray cluster, logged through `fashion-sweep-server`.

Ray's servers listen on every interface whatever --node-ip-address says, so the whole cluster, the server and
the sweeps run inside a network namespace that holds only loopback (`unshare -n`): nothing can be reached from
outside. The scenario is one bash script; it stops what it starts (the server by its process group id, Ray with
`ray stop`, then any process left under its temp dir by id). The test reads the server's SQLite store afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import BIN
from tests.test_resume import EPOCH_METRICS

SCENARIO = r"""
set -euo pipefail
ip link set lo up
ip -o addr > "$OUT/interfaces.txt"
cleanup() {
  [ -n "${SERVER:-}" ] && kill -- "-$SERVER" 2>/dev/null || true
  "$BIN/ray" stop --force > /dev/null 2>&1 || true
  for pid in $(pgrep -f "$RAY_TMP" || true); do kill -9 "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
export RAY_USAGE_STATS_ENABLED=0
"$BIN/ray" start --head --node-ip-address=127.0.0.1 --port=6379 --num-cpus=1 --temp-dir="$RAY_TMP" \
  --include-dashboard=false > "$OUT/ray-head.log" 2>&1
"$BIN/ray" start --address=127.0.0.1:6379 --node-ip-address=127.0.0.1 --num-cpus=1 > "$OUT/ray-node.log" 2>&1
setsid "$BIN/fashion-sweep-server" --port 5000 --workers 1 --backend-store-uri "sqlite:///$OUT/server/mlflow.db" \
  --artifacts-destination "$OUT/server/artifacts" > "$OUT/server.log" 2>&1 &
SERVER=$!
"$BIN/python" -c "
import time, urllib.request
for _ in range(120):
    try:
        urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=2); break
    except OSError:
        time.sleep(0.5)
"
RAY=(hydra/launcher=ray_cluster hydra.launcher.ray.remote.num_cpus=1 tracking=server tracking.log_model=false
     trainer.verbose=0)

# 1. A grid of two jobs, one per node; the Ray worker of the first job to end an epoch is killed (Ray prefixes
#    each line a worker prints with its pid).
"$BIN/fashion-sweep" --multirun "${RAY[@]}" optimizer.lr=0.001,0.003 data.train_size=3000 trainer.epochs=4 \
  "hydra.sweep.dir=$OUT/grid" > "$OUT/grid.log" 2>&1 &
SWEEP=$!
for _ in $(seq 1200); do grep -q "epoch 1/4" "$OUT/grid.log" && break; sleep 0.2; done
WORKER=$(grep -m1 "epoch 1/4" "$OUT/grid.log" | sed -E 's/.*pid=([0-9]+).*/\1/')
kill -9 "$WORKER"
echo "$WORKER" > "$OUT/killed.txt"
wait "$SWEEP"

# 2. Successive halving on the same cluster.
"$BIN/fashion-sweep" --multirun "${RAY[@]}" hydra/sweeper=halving optimizer.lr=0.00001,0.001,0.3 \
  data.train_size=2000 trainer.epochs=3 "hydra.sweep.dir=$OUT/halving" > "$OUT/halving.log" 2>&1
ss -ltn > "$OUT/listening.txt"
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MlflowClient]:
    """Run the scenario once; yields its folder and a client on the server's store."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"]).returncode != 0:
        pytest.fail("this test needs `unshare -n` (util-linux, run as root): Ray must not listen beyond loopback")
    out = tmp_path_factory.mktemp("ray")
    ray_tmp = Path("/tmp") / f"ray-test-{os.getpid()}"  # Ray's socket paths must stay short
    env = {**os.environ, "OUT": str(out), "BIN": str(BIN), "RAY_TMP": str(ray_tmp)}
    proc = subprocess.run(["unshare", "-n", "bash", "-c", SCENARIO], env=env, cwd=out, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    logs = {p.name: p.read_text() for p in out.glob("*.log")}
    assert proc.returncode == 0, f"{proc.stderr}\n" + "\n".join(f"--- {k}\n{v[-3000:]}" for k, v in logs.items())
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return out, MlflowClient(f"sqlite:///{out / 'server' / 'mlflow.db'}")


def sweep(client: MlflowClient, name: str):
    (experiment,) = [e for e in client.search_experiments() if e.name == "fashion-sweep-shared"]
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent" and r.data.tags.get("launch")]
    (parent,) = [p for p in parents if f"/{name}" in p.data.tags["launch"]]
    return parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def steps(client: MlflowClient, run_id: str) -> dict[str, list[int]]:
    return {m: sorted(p.step for p in client.get_metric_history(run_id, m)) for m in EPOCH_METRICS}


def test_the_cluster_was_reachable_on_loopback_only(cluster) -> None:
    out, _ = cluster
    interfaces = {line.split()[1] for line in (out / "interfaces.txt").read_text().splitlines()}
    assert interfaces == {"lo"}
    assert "6379" in (out / "listening.txt").read_text()  # Ray's GCS was listening, in the namespace only


def test_a_sweep_on_ray_logs_through_the_server_and_a_killed_workers_job_continues_its_run(cluster) -> None:
    out, client = cluster
    parent, children = sweep(client, "grid")
    assert parent.info.status == "FINISHED" and "best_lr" in parent.data.params
    assert sorted(c.data.params["optimizer.lr"] for c in children) == ["0.001", "0.003"]  # no duplicate child
    for child in children:
        assert child.info.status == "FINISHED" and child.info.artifact_uri.startswith("mlflow-artifacts:/")
        assert steps(client, child.info.run_id) == {m: [1, 2, 3, 4] for m in EPOCH_METRICS}
    killed = (out / "killed.txt").read_text().strip()
    log = (out / "grid.log").read_text()
    assert f"Worker PID: {killed}" in log and "will be retried" in log  # Ray saw its worker die, ran the job again,
    assert "from its checkpoint after epoch" in log  # and the job went on in its own run
    assert (out / "grid" / "report" / "summary.csv").is_file()


def test_halving_runs_its_rungs_on_ray(cluster) -> None:
    _, client = cluster
    parent, children = sweep(client, "halving")
    assert parent.info.status == "FINISHED" and parent.data.tags["halving_rungs"] == "1,3"
    assert parent.data.params["best_lr"] == "0.001"
    pruned = {c.data.params["optimizer.lr"] for c in children if c.data.tags.get("pruned") == "true"}
    assert pruned == {"1e-05", "0.3"} and len(children) == 3
    (winner,) = [c for c in children if c.data.params["optimizer.lr"] == "0.001"]
    assert winner.info.status == "FINISHED"
    assert steps(client, winner.info.run_id) == {m: [1, 2, 3] for m in EPOCH_METRICS}
