"""Per-job overhead of a sweep alone: the sweep-scaling part of benchmarks.run, in about 3 minutes.

Multiruns of 1, 3 and 6 jobs (2,000-image slice, 1 epoch, model logging on, tracking.test_set at its default); a
job's overhead is its MLflow run's duration minus the `fit_seconds` it logged, as in benchmarks.run, shown for the
first job of a process (which also pays one-time costs) and the later ones apart; what the sweep does once after its
last job (report, the test set scored for the selected run, registration) is shown apart too.
`python -m benchmarks.job_overhead [--quick] [--out DIR] [OVERRIDE ...]`; writes <date>-job-overhead.md
(OVERRIDEs go to every job, e.g. `trainer.precision=float32`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import date
from pathlib import Path

from benchmarks.run import HERE, SETTINGS, Harness, machine, sweep_scaling, table, write_results


def markdown(rows: list[dict], settings: dict, cpu: dict) -> str:
    overrides = " ".join(settings["overrides"])
    lines = [
        f"# Per-job overhead of a sweep ({date.today()})",
        "",
        f"CPU: {cpu['cpu']}, {cpu['cores']} cores, flags {', '.join(cpu['simd'])}; trainer.precision=auto picks "
        f"{cpu['auto_precision']}. Settings: {json.dumps(settings)}. `python -m benchmarks.job_overhead`; the target "
        "(<= 3 s) is benchmarks.run's `per_job_overhead_seconds`, the largest of the per-job means below."
        + (f" Every job with `{overrides}`." if overrides else ""),
        "",
        *table(
            [
                "multirun jobs",
                "wall s",
                "per-job overhead s (mean)",
                "first job s",
                "later jobs s (mean)",
                "test set s (runs scored)",
                "after the last job s",
            ],
            [
                [
                    str(r["jobs"]),
                    f"{r['wall_seconds']:.1f}",
                    f"{r['per_job_overhead_seconds']:.2f}",
                    f"{r['first_job_overhead_seconds']:.2f}",
                    "" if r["later_jobs_overhead_seconds"] is None else f"{r['later_jobs_overhead_seconds']:.2f}",
                    f"{r['test_set_seconds']:.2f} ({r['scored_runs']})",
                    f"{r['after_last_job_seconds']:.2f}",
                ]
                for r in rows
            ],
        ),  # fmt: skip
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest setting: checks the benchmark still runs")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the results")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job, e.g. trainer.precision=float32")
    args = parser.parse_args()
    s = SETTINGS["quick" if args.quick else "full"]
    settings = {"jobs": s["sweep_jobs"], "train_size": s["sweep_train_size"], "epochs": 1, "overrides": args.overrides}
    cpu = machine()
    with tempfile.TemporaryDirectory() as folder:
        rows = sweep_scaling(Harness(Path(folder)), s, tuple(args.overrides))
    write_results(args.out, "job-overhead", markdown(rows, settings, cpu))


if __name__ == "__main__":
    main()
