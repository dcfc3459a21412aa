"""How many writers one `fashion-sweep-server` takes: SQLite vs PostgreSQL behind it.

N = 1, 2, 4, 8 writer processes at once each log a sweep's worth of runs through the server the way a job does
(per epoch one log_metrics call with the six epoch metrics, then a heartbeat tag). Measures metric values per
second over the wall time of all N, and checks afterwards that every value is in the store (nothing lost).
PostgreSQL is Debian's (`apt-get install postgresql`), started by this benchmark on 127.0.0.1 in a scratch
folder and stopped after. `python -m benchmarks.server_load [--runs 5] [--epochs 20]`; writes
benchmarks/results/<date>-server-load.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds")
WRITERS = (1, 2, 4, 8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write(uri: str, experiment_id: str, runs: int, epochs: int, start_at: float) -> None:
    """One writer: runs runs of epochs epochs, logged as callbacks.EpochRecorder logs them, from start_at (all
    writers start together, after their imports); prints its start and end times."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    time.sleep(max(0.0, start_at - time.time()))
    started = time.time()
    for _ in range(runs):
        run_id = client.create_run(experiment_id).info.run_id
        for epoch in range(1, epochs + 1):
            now = int(time.time() * 1000)
            metrics = [_metric(name, 0.5 / epoch, now, epoch) for name in EPOCH_METRICS]
            client.log_batch(run_id, metrics=metrics)
            client.set_tag(run_id, "heartbeat", datetime.now(UTC).isoformat())
        client.set_terminated(run_id, "FINISHED")
    print(json.dumps({"start": started, "end": time.time()}), flush=True)


def _metric(name: str, value: float, timestamp: int, step: int):
    from mlflow.entities import Metric

    return Metric(name, value, timestamp, step)


@contextmanager
def postgres() -> Iterator[str]:
    """A scratch PostgreSQL cluster on 127.0.0.1 (Debian's binaries, run as user postgres); yields its URI."""
    bindir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bindir or shutil.which("runuser") is None:
        raise SystemExit("benchmark: PostgreSQL is not installed: apt-get install -y postgresql")
    pg, port = Path(bindir[-1]), free_port()
    folder = Path(tempfile.mkdtemp(prefix="pg-"))
    shutil.chown(folder, "postgres")
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_postgres, pg / "initdb", "-D", folder / "data", "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)  # fmt: skip
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}"
    subprocess.run([*as_postgres, pg / "pg_ctl", "-D", folder / "data", "-o", options, "-l", folder / "log", "-w",
                    "start"], check=True, capture_output=True)  # fmt: skip
    try:
        subprocess.run([*as_postgres, pg / "createdb", "-h", "127.0.0.1", "-p", str(port), "mlflow"], check=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_postgres, pg / "pg_ctl", "-D", folder / "data", "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def server(backend: str, artifacts: Path) -> Iterator[str]:
    """fashion-sweep-server on backend, its own process group, stopped by its id after."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "fashion-sweep-server"), "--port", str(port), "--backend-store-uri", backend,
                             "--artifacts-destination", str(artifacts)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def load(url: str, writers: int, runs: int, epochs: int) -> dict:
    """writers processes at once, each writing runs x epochs; metric values/s (from the first writer's start to the
    last one's end, imports excluded) and whether all arrived."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    experiment_id = client.create_experiment(f"load-{writers}-{time.time_ns()}")
    start_at = time.time() + 15  # every writer has imported MLflow by then
    command = [sys.executable, "-m", "benchmarks.server_load", "--writer", url, experiment_id, str(runs), str(epochs),
               str(start_at)]  # fmt: skip
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(writers)]
    outputs = [p.communicate()[0] for p in procs]
    codes = [p.returncode for p in procs]
    spans = [json.loads(out.strip().splitlines()[-1]) for out in outputs if out.strip()]
    wall = max(s["end"] for s in spans) - min(s["start"] for s in spans)
    logged = client.search_runs([experiment_id], max_results=10_000)
    stored = sum(len(client.get_metric_history(r.info.run_id, m)) for r in logged for m in EPOCH_METRICS)
    expected = writers * runs * epochs * len(EPOCH_METRICS)
    return {"writers": writers, "wall_seconds": round(wall, 2), "metrics_per_second": round(expected / wall, 1),
            "requests_per_second": round(2 * writers * runs * epochs / wall, 1), "expected": expected,
            "stored": stored, "failed_writers": sum(c != 0 for c in codes)}  # fmt: skip


def markdown(results: dict[str, list[dict]], settings: dict, cpu: dict) -> str:
    from benchmarks.run import table  # TensorFlow comes with it: not in the writers

    rows = [
        [backend, str(r["writers"]), f"{r['metrics_per_second']:.0f}", f"{r['requests_per_second']:.0f}",
         f"{r['wall_seconds']:.1f}", f"{r['stored']}/{r['expected']}", str(r["failed_writers"])]
        for backend, measured in results.items() for r in measured
    ]  # fmt: skip
    header = ["backend", "writers", "metric values/s", "requests/s", "wall s", "stored/expected", "failed writers"]
    return "\n".join([
        f"# fashion-sweep-server under load ({date.today()})", "",
        f"CPU: {cpu['cpu']}, {cpu['cores']} cores. Settings: {json.dumps(settings)} per writer; the server with "
        "--workers 2 on the same machine as the writers; each writer logs as fast as it can (a training job logs",
        "2 requests per epoch, one every ~7 s on the full data here). Rates over the writers' own time, from the",
        "first start to the last end (all start together, after their imports). `python -m benchmarks.server_load`.",
        "",
        *table(header, rows),
    ]) + "\n"  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per writer (a 5-rate sweep)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per run")
    parser.add_argument("--writer", nargs=5, help=argparse.SUPPRESS)  # URL EXPERIMENT RUNS EPOCHS START_AT
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the results")
    args = parser.parse_args()
    if args.writer:
        url, experiment_id, runs, epochs, start_at = args.writer
        return write(url, experiment_id, int(runs), int(epochs), float(start_at))

    from benchmarks.run import machine, write_results  # TensorFlow comes with them: not in the writers

    cpu = machine()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as folder:
        with server(f"sqlite:///{folder}/mlflow.db", Path(folder, "a")) as url:
            results["SQLite"] = [load(url, n, args.runs, args.epochs) for n in WRITERS]
        with postgres() as backend, server(backend, Path(folder, "b")) as url:
            results["PostgreSQL"] = [load(url, n, args.runs, args.epochs) for n in WRITERS]
    write_results(args.out, "server-load", markdown(results, {"runs": args.runs, "epochs": args.epochs}, cpu))


if __name__ == "__main__":
    main()
