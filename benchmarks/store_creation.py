"""What creating a new SQLite store costs when several processes start at once.

Each process opens the store as a job does (runs.connect: the lock beside the store, MLflow's migrations, the
experiment) and prints the seconds it spent inside; run alone and N at once into a fresh store, alternating,
`repeats` times. Prints one JSON line: `.venv/bin/python -m benchmarks.store_creation` (about a minute).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

OPEN_ONCE = """
import sys, time
from omegaconf import OmegaConf
from fashion_sweep import runs
cfg = OmegaConf.create({"uri": sys.argv[1], "experiment": "fashion-sweep", "artifact_location": sys.argv[2]})
started = time.perf_counter()
runs.connect(cfg)
print(time.perf_counter() - started)
"""


def open_at_once(processes: int) -> list[float]:
    """Seconds inside runs.connect of each of `processes` processes started together on one fresh store."""
    with tempfile.TemporaryDirectory() as folder:
        uri, artifacts = f"sqlite:///{folder}/mlflow.db", f"{folder}/artifacts"
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_ONCE, uri, artifacts], stdout=subprocess.PIPE,
                                  text=True) for _ in range(processes)]  # fmt: skip
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
        if any(proc.returncode for proc in procs):
            raise SystemExit(f"a process failed to open the new store: {[p.returncode for p in procs]}")
        assert Path(folder, "mlflow.db").is_file()
    return [float(out.strip().splitlines()[-1]) for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4, help="processes started at once")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of alone / at once")
    args = parser.parse_args()
    alone, together = [], []
    for _ in range(args.repeats):
        alone += open_at_once(1)
        together.append(max(open_at_once(args.processes)))
    print(json.dumps({
        "alone_seconds": [round(s, 2) for s in alone], "alone_median": round(statistics.median(alone), 2),
        f"slowest_of_{args.processes}_seconds": [round(s, 2) for s in together],
        f"slowest_of_{args.processes}_median": round(statistics.median(together), 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
