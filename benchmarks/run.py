"""fashion-sweep's benchmarks in one command: `python -m benchmarks.run` (about 25 minutes on 2 cores).

Measures, each as a ratio or fraction within this one run (the machines are shared and noisy):
1. throughput: training images/s of `fashion-sweep` vs benchmarks/baseline.py (plain Keras), interleaved;
2. utilisation: seed_cnn's training FLOP/s (benchmarks/flops.py) over the best float32 matmul's FLOP/s;
3. overhead: wall time of a whole run minus the time inside model.fit, for a 1- and a 20-epoch run;
4. sweep scaling: wall time of a multirun of N = 1, 3, 6 jobs, per-job overhead, dataset decodes;
5. memory: peak resident memory of one full run and of the 6-job multirun.
Writes benchmarks/results/<date>.json and <date>.md. `--quick` runs everything in its smallest setting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from importlib.metadata import version
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fashion_sweep.backend import cpu_flags, cpuinfo_field, precision_here

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
SETTINGS: dict[str, dict[str, Any]] = {
    "full": {
        "repeats": 3,  # harness/baseline pairs of the throughput benchmark
        "throughput_epochs": 2,  # the first is the warm-up
        "train_size": None,  # all 54,000 training images (as the default run)
        "overhead_epochs": [1, 20],
        "sweep_jobs": [1, 3, 6],
        "sweep_train_size": 2000,  # the small slice of the sweep-scaling benchmark
        "matmul_sizes": (512, 1024, 2048, 4096),
        "matmul_seconds": 4.0,  # per size: the best trial counts
    },
    "quick": {
        "repeats": 1,
        "throughput_epochs": 2,
        "train_size": 1000,
        "overhead_epochs": [1],
        "sweep_jobs": [1, 2],
        "sweep_train_size": 1000,
        "matmul_sizes": (256, 512),
        "matmul_seconds": 1.0,
    },
}
SWEEP_RATES = [0.001, 0.0003, 0.003, 0.0001, 0.01, 0.00003]  # lrs of the sweep-scaling multiruns, in order
TARGETS = {
    "throughput_ratio": (">=", 1.0),
    "utilisation": (">=", 0.5),
    "overhead_fraction_longest": ("<=", 0.03),
    "per_job_overhead_seconds": ("<=", 3.0),
    "peak_rss_gb_one_run": ("<=", 3.0),
}


@dataclass
class Finished:
    """A child process that ended: exit code, wall seconds, peak resident memory, its output."""

    returncode: int
    wall_seconds: float
    peak_rss_gb: float
    stdout: str
    stderr: str


def timed(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> Finished:
    """Run command to its end; measure wall time and the child's own peak RSS (os.wait4's rusage)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
        out.seek(0), err.seek(0)
        finished = Finished(proc.returncode, wall, usage.ru_maxrss / 1024**2, out.read(), err.read())
    if finished.returncode != 0:
        tail = "\n".join(finished.stderr.strip().splitlines()[-5:])
        raise SystemExit(f"benchmark: {' '.join(command[:3])} ... failed ({finished.returncode}):\n{tail}")
    return finished


class Harness:
    """`fashion-sweep` runs into one scratch MLflow store, one experiment per invocation."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.uri = f"sqlite:///{workdir / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)
        self.invocations = 0

    def run(self, *overrides: str, multirun: bool = False) -> tuple[Finished, list[Run]]:
        """One invocation; returns the process and its job runs (a multirun's parent left out)."""
        self.invocations += 1
        experiment = f"bench-{self.invocations}"
        command = [
            str(BIN / "fashion-sweep"),
            *(["--multirun"] if multirun else []),
            f"tracking.uri={self.uri}",
            f"tracking.artifact_location={self.workdir / 'artifacts'}",
            f"tracking.experiment={experiment}",
            f"hydra.run.dir={self.workdir}/outputs/{experiment}",
            f"hydra.sweep.dir={self.workdir}/multirun/{experiment}",
            "trainer.verbose=0",
            *overrides,
        ]
        finished = timed(command, self.workdir)
        exp = self.client.get_experiment_by_name(experiment)
        runs = self.client.search_runs([exp.experiment_id]) if exp else []
        return finished, [run for run in runs if run.data.tags.get("sweep_role") != "parent"]

    def sweep_seconds_after_last_job(self, jobs: list[Run]) -> float:
        """From the end of the newest sweep's last job to the end of its parent run: the report, the test set
        scored for the selected run, the registration."""
        experiment = self.client.get_experiment_by_name(f"bench-{self.invocations}")
        assert experiment is not None, "the sweep created no experiment"
        (parent,) = self.client.search_runs([experiment.experiment_id], "tags.sweep_role = 'parent'")
        return (parent.info.end_time - max(job.info.end_time for job in jobs)) / 1000

    def epoch_seconds(self, run: Run) -> list[float]:
        history = self.client.get_metric_history(run.info.run_id, "epoch_seconds")
        return [m.value for m in sorted(history, key=lambda m: m.step)]


def images_per_second(train_images: int, epoch_seconds: list[float]) -> float:
    """Training images per second over the epochs after the first (the warm-up)."""
    measured = epoch_seconds[1:] or epoch_seconds
    return train_images / statistics.mean(measured)


def size_overrides(train_size: int | None) -> list[str]:
    return [] if train_size is None else [f"data.train_size={train_size}"]


def throughput(harness: Harness, s: dict[str, Any]) -> dict[str, Any]:
    """Baseline and harness interleaved (A B A B ...), same data, same epochs; median of the pair ratios."""
    pairs = []
    for _ in range(s["repeats"]):
        size = [] if s["train_size"] is None else ["--train-size", str(s["train_size"])]
        base = timed([sys.executable, str(HERE / "baseline.py"), "--epochs", str(s["throughput_epochs"]), *size], HERE)
        base_result = json.loads(base.stdout.strip().splitlines()[-1])
        _, runs = harness.run(f"trainer.epochs={s['throughput_epochs']}", *size_overrides(s["train_size"]))
        (run,) = runs
        pairs.append(
            {
                "baseline_images_per_s": images_per_second(base_result["train_images"], base_result["epoch_seconds"]),
                "harness_images_per_s": images_per_second(int(run.data.params["n_train"]), harness.epoch_seconds(run)),
            }
        )
    ratios = [p["harness_images_per_s"] / p["baseline_images_per_s"] for p in pairs]
    return {
        "pairs": pairs,
        "ratio_median": statistics.median(ratios),
        "harness_images_per_s_median": statistics.median(p["harness_images_per_s"] for p in pairs),
        "baseline_images_per_s_median": statistics.median(p["baseline_images_per_s"] for p in pairs),
    }


def utilisation(harness_images_per_s: float, matmul_sizes: tuple[int, ...], seconds: float) -> dict[str, Any]:
    """seed_cnn's training FLOP/s at the measured throughput, as a fraction of the matmul peak."""
    # TensorFlow only here: the benchmarks' own process otherwise just starts and reads runs (~5 s less each)
    from benchmarks.flops import matmul_peak, training_flops_per_image
    from fashion_sweep.models import build_model

    with initialize_config_module("fashion_sweep.conf", version_base="1.3"):
        model = build_model(compose("config").model)
    flops = training_flops_per_image(model)
    per_size = matmul_peak(matmul_sizes, seconds)
    peak = max(per_size.values())
    return {
        "training_flops_per_image": flops,
        "matmul_gflops_by_size": {size: value / 1e9 for size, value in per_size.items()},
        "matmul_peak_gflops": peak / 1e9,
        "training_gflops": flops * harness_images_per_s / 1e9,
        "fraction_of_peak": flops * harness_images_per_s / peak,
    }


def overhead(harness: Harness, s: dict[str, Any]) -> list[dict[str, Any]]:
    """Whole-run wall time minus time inside model.fit (logged by the harness as fit_seconds)."""
    rows = []
    for epochs in s["overhead_epochs"]:
        finished, (run,) = harness.run(f"trainer.epochs={epochs}", *size_overrides(s["train_size"]))
        fit = run.data.metrics["fit_seconds"]
        rows.append(
            {
                "epochs": epochs,
                "wall_seconds": finished.wall_seconds,
                "fit_seconds": fit,
                "overhead_seconds": finished.wall_seconds - fit,
                "overhead_fraction": (finished.wall_seconds - fit) / finished.wall_seconds,
                "test_seconds": run.data.metrics["test_seconds"],  # part of the overhead: predicting 10,000 images
                "peak_rss_gb": finished.peak_rss_gb,
                "test_accuracy": run.data.metrics.get("test_accuracy"),
            }
        )
    return rows


def sweep_scaling(harness: Harness, s: dict[str, Any], overrides: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Multiruns of N jobs (small slice, 1 epoch): wall time, per-job overhead, how often data was decoded."""
    rows = []
    for n in s["sweep_jobs"]:
        rates = ",".join(map(str, SWEEP_RATES[:n]))
        finished, runs = harness.run(
            f"optimizer.lr={rates}",
            "trainer.epochs=1",
            f"data.train_size={s['sweep_train_size']}",
            *overrides,
            multirun=True,
        )
        runs = sorted(runs, key=lambda r: r.info.start_time)
        job_overheads = [(r.info.end_time - r.info.start_time) / 1000 - r.data.metrics["fit_seconds"] for r in runs]
        rows.append(
            {
                "jobs": n,
                "wall_seconds": finished.wall_seconds,
                "per_job_overhead_seconds": statistics.mean(job_overheads),
                "first_job_overhead_seconds": job_overheads[0],  # it also pays the process's one-time costs
                "later_jobs_overhead_seconds": statistics.mean(job_overheads[1:]) if n > 1 else None,
                # the test set, scored by the jobs (tracking.test_set=all) or once, for the selected run, after them
                "test_set_seconds": sum(r.data.metrics.get("test_seconds", 0.0) for r in runs),
                "scored_runs": sum("test_seconds" in r.data.metrics for r in runs),
                "after_last_job_seconds": harness.sweep_seconds_after_last_job(runs),  # report, scoring, registry
                "dataset_decodes": (finished.stdout + finished.stderr).count("Decoded Fashion-MNIST"),
                "peak_rss_gb": finished.peak_rss_gb,
            }
        )
    first = rows[0]
    for row in rows:
        row["wall_seconds_per_added_job"] = (
            (row["wall_seconds"] - first["wall_seconds"]) / (row["jobs"] - first["jobs"]) if row is not first else None
        )
    return rows


def write_results(out: Path, name: str, report: str) -> None:
    """report into out/<date>-<name>.md, printed too."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{date.today()}-{name}.md"
    path.write_text(report)
    print(report + f"\nWritten to {path}")


def machine() -> dict[str, Any]:
    flags = cpu_flags()
    return {
        "cpu": cpuinfo_field("model name", Path("/proc/cpuinfo")) or "?",
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "simd": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags],
        "auto_precision": " ".join(precision_here("auto")),  # what auto picks here (under oneDNN's ISA cap, if set)
        "onednn_isa": onednn_isa(),
        "python": platform.python_version(),
        "tensorflow": version("tensorflow"),
        "keras": version("keras"),
        "mlflow": version("mlflow"),
    }


def onednn_isa() -> str:
    """The instruction set oneDNN runs its kernels with in a child process of this environment (ONEDNN_MAX_CPU_ISA
    caps it) and the kernel of a 3x3 convolution, as oneDNN's verbose mode names them: "Intel AVX2 (brg_conv_fwd:avx2)"
    """
    probe = "import tensorflow as tf; tf.nn.conv2d(tf.ones([8, 28, 28, 16]), tf.ones([3, 3, 16, 16]), 1, 'SAME')"
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300).stdout
    isa = next((line.split("isa:", 1)[1] for line in out.splitlines() if ",isa:" in line), "?")
    kernel = next((line.split(",")[6] for line in out.splitlines() if ",exec,cpu,convolution," in line), "?")
    return f"{isa.strip()} ({kernel})"


def announced_machine() -> dict[str, Any]:
    """machine(), its CPU line printed first: a long benchmark says at once where it runs and what auto picks."""
    cpu = machine()
    print(f"CPU: {cpu['cpu']} ({', '.join(cpu['simd'])}); oneDNN ISA: {cpu['onednn_isa']}", flush=True)
    print(f"trainer.precision={cpu['auto_precision']}", flush=True)
    return cpu


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    """Each target of the issue, the value measured and whether it is met."""
    values = {
        "throughput_ratio": results["throughput"]["ratio_median"],
        "utilisation": results["utilisation"]["fraction_of_peak"],
        "overhead_fraction_longest": results["overhead"][-1]["overhead_fraction"],
        "per_job_overhead_seconds": max(r["per_job_overhead_seconds"] for r in results["sweep_scaling"]),
        "peak_rss_gb_one_run": max(r["peak_rss_gb"] for r in results["overhead"]),
    }
    out = {}
    for name, (op, target) in TARGETS.items():
        value = values[name]
        met = value >= target if op == ">=" else value <= target
        out[name] = {"value": value, "target": f"{op} {target}", "met": met}
    return out


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(results: dict[str, Any]) -> str:
    """The results as short markdown tables."""
    m, t, u = results["machine"], results["throughput"], results["utilisation"]
    lines = [
        f"Measured {results['date']} ({results['setting']} setting, {results['wall_minutes']:.1f} min) on "
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB, SIMD {'/'.join(m['simd'])} "
        f"(trainer.precision={m.get('auto_precision', 'auto: not recorded')}); "
        f"TensorFlow {m['tensorflow']}, Keras {m['keras']}, MLflow {m['mlflow']}.",
        "",
    ]
    targets = results["targets"].items()
    lines += table(
        ["target", "measured", "target", "met"],
        [[name, f"{v['value']:.3g}", v["target"], "yes" if v["met"] else "no"] for name, v in targets],
    )
    lines += [
        "",
        f"Throughput (median of {len(t['pairs'])} interleaved pairs): harness {t['harness_images_per_s_median']:.0f} "
        f"images/s, plain Keras {t['baseline_images_per_s_median']:.0f} images/s, ratio {t['ratio_median']:.2f}. "
        f"Utilisation: {u['training_flops_per_image'] / 1e6:.1f} MFLOP per training image x throughput = "
        f"{u['training_gflops']:.1f} GFLOP/s of the best float32 matmul's {u['matmul_peak_gflops']:.1f} GFLOP/s "
        f"({u['fraction_of_peak']:.0%}).",
        "",
    ]
    lines += table(
        ["run", "wall s", "in model.fit s", "overhead s", "of it, test set s", "overhead", "peak RSS GB", "test acc"],
        [
            [f"{r['epochs']} epoch(s)", f"{r['wall_seconds']:.1f}", f"{r['fit_seconds']:.1f}"]
            + [f"{r['overhead_seconds']:.1f}", f"{r['test_seconds']:.1f}", f"{r['overhead_fraction']:.1%}"]
            + [f"{r['peak_rss_gb']:.2f}", f"{r['test_accuracy']:.4f}"]
            for r in results["overhead"]
        ],
    )
    lines.append("")
    lines += table(
        ["multirun jobs", "wall s", "s per added job", "per-job overhead s", "test set s", "decodes", "RSS GB"],
        [
            [str(r["jobs"]), f"{r['wall_seconds']:.1f}"]
            + ["" if r["wall_seconds_per_added_job"] is None else f"{r['wall_seconds_per_added_job']:.1f}"]
            + [f"{r['per_job_overhead_seconds']:.1f}", f"{r['test_set_seconds']:.1f}", str(r["dataset_decodes"])]
            + [f"{r['peak_rss_gb']:.2f}"]
            for r in results["sweep_scaling"]
        ],
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest setting: checks the benchmarks still run")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for <date>.json and <date>.md")
    args = parser.parse_args()
    setting = "quick" if args.quick else "full"
    s = SETTINGS[setting]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fashion-sweep-bench-") as tmp:
        harness = Harness(Path(tmp))
        results: dict[str, Any] = {"date": date.today().isoformat(), "setting": setting, "settings": s}
        results["machine"] = machine()
        print("throughput: plain Keras vs fashion-sweep, interleaved ...", flush=True)
        results["throughput"] = throughput(harness, s)
        print("utilisation: FLOPs and matmul peak ...", flush=True)
        results["utilisation"] = utilisation(
            results["throughput"]["harness_images_per_s_median"], s["matmul_sizes"], s["matmul_seconds"]
        )
        print(f"overhead: {s['overhead_epochs']}-epoch runs ...", flush=True)
        results["overhead"] = overhead(harness, s)
        print(f"sweep scaling: multiruns of {s['sweep_jobs']} jobs ...", flush=True)
        results["sweep_scaling"] = sweep_scaling(harness, s)
    results["wall_minutes"] = (time.perf_counter() - started) / 60
    results["targets"] = verdicts(results)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / results["date"]
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    print(f"written: {stem}.json, {stem}.md")


if __name__ == "__main__":
    main()
