"""The benchmarks still run and write well-formed results (their smallest setting); FLOPs are counted right.

Timings are never asserted here: they belong to `python -m benchmarks.run` on a quiet machine.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import keras
import pytest
from keras import layers

from benchmarks import job_overhead
from benchmarks.flops import forward_macs, training_flops_per_image
from tests.conftest import ROOT


def run_module(module: str, *args: str) -> None:
    """`python -m module args` from the project root; fails the test with the end of its stderr."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_flops_count_dense_layers_from_their_shapes() -> None:
    model = keras.Sequential([keras.Input((3,)), layers.Dense(2), layers.Dropout(0.5), layers.Dense(4)])
    assert [forward_macs(layer) for layer in model.layers] == [6, 0, 8]
    # first layer: forward + weight gradient (2x); the next: forward + weight and input gradients (3x)
    assert training_flops_per_image(model) == 2 * (2 * 6 + 3 * 8)


def test_flops_count_a_same_padded_conv_layer_per_output_pixel() -> None:
    model = keras.Sequential([keras.Input((5, 5, 2)), layers.Conv2D(4, 3, padding="same"), layers.MaxPooling2D()])
    assert forward_macs(model.layers[0]) == 5 * 5 * 4 * (3 * 3 * 2)
    assert forward_macs(model.layers[1]) == 0


def test_benchmarks_run_in_their_smallest_setting_and_write_results(tmp_path: Path) -> None:
    run_module("benchmarks.run", "--quick", "--out", str(tmp_path))
    (json_file,) = tmp_path.glob("*.json")
    results = json.loads(json_file.read_text())
    assert results["setting"] == "quick"

    (pair,) = results["throughput"]["pairs"]
    assert pair["harness_images_per_s"] > 0 and pair["baseline_images_per_s"] > 0
    assert results["utilisation"]["training_flops_per_image"] > 0
    assert 0 < results["utilisation"]["fraction_of_peak"] < math.inf
    assert [r["epochs"] for r in results["overhead"]] == [1]
    for row in results["overhead"]:
        assert 0 < row["fit_seconds"] < row["wall_seconds"] and 0 < row["overhead_fraction"] < 1
        assert row["peak_rss_gb"] > 0.1 and 0 < row["test_accuracy"] <= 1
    assert [r["jobs"] for r in results["sweep_scaling"]] == [1, 2]
    assert all(r["dataset_decodes"] == 1 for r in results["sweep_scaling"])  # once per process, not per job
    assert all(r["per_job_overhead_seconds"] > 0 for r in results["sweep_scaling"])
    assert all(r["scored_runs"] == 1 and r["test_set_seconds"] > 0 for r in results["sweep_scaling"])  # once a sweep
    assert all(r["after_last_job_seconds"] > r["test_set_seconds"] for r in results["sweep_scaling"])
    one, two = results["sweep_scaling"]
    assert one["later_jobs_overhead_seconds"] is None and two["later_jobs_overhead_seconds"] > 0
    assert two["per_job_overhead_seconds"] * 2 == pytest.approx(
        two["first_job_overhead_seconds"] + two["later_jobs_overhead_seconds"]
    )
    settings = {"overrides": ["trainer.precision=float32"]}
    overhead_table = job_overhead.markdown(results["sweep_scaling"], settings, results["machine"])
    assert overhead_table.count("\n| ") == 3 and results["machine"]["cpu"] in overhead_table  # header + 2 rows
    assert "Every job with `trainer.precision=float32`." in overhead_table
    assert set(results["targets"]) == {
        "throughput_ratio", "utilisation", "overhead_fraction_longest", "per_job_overhead_seconds",
        "peak_rss_gb_one_run",
    }  # fmt: skip
    assert all(isinstance(t["met"], bool) for t in results["targets"].values())

    table = json_file.with_suffix(".md").read_text()
    assert "| throughput_ratio |" in table and "| 1 epoch(s) |" in table and "| multirun jobs |" in table


def test_options_benchmark_runs_an_option_against_plain_keras(tmp_path: Path) -> None:
    options = ["--options", "eval_batch_1024", "--pairs", "1", "--epochs", "1", "--train-size", "500"]
    run_module("benchmarks.options", *options, "--out", str(tmp_path))
    (table,) = tmp_path.glob("*-options.md")
    (row,) = [line for line in table.read_text().splitlines() if line.startswith("| eval_batch_1024 |")]
    plain, option, ratio = (float(cell) for cell in row.strip("| ").split(" | ")[2:])
    assert plain > 0 and option > 0 and ratio > 0


def test_best_cnn_benchmark_pairs_the_reference_and_the_preset_under_an_isa_cap(tmp_path: Path) -> None:
    run_module("benchmarks.best_cnn", "--seeds", "7", "--pairs", "1", "--train-size", "500", "--epochs", "1",
               "--isa", "avx2", "--out", str(tmp_path))  # fmt: skip
    (table,) = tmp_path.glob("*-best-cnn-avx2.md")
    text = table.read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(("| reference |", "| best_cnn ("))]
    assert [(r[0], r[1]) for r in rows] == [("| reference", "7"), ("| best_cnn (best_cnn-float32)", "7")]
    assert all(r[4:6] == ["1", "float32"] and 0 < float(r[6].rstrip("% |")) <= 100 for r in rows)  # auto: float32
    assert "oneDNN ISA Intel AVX2 (brg_conv_fwd:avx2), capped by ONEDNN_MAX_CPU_ISA=AVX2" in text  # what oneDNN ran
    assert "| wall time best_cnn / reference (per pair) |" in text


def test_sweep_free_benchmark_sets_the_grids_best_beside_the_control(tmp_path: Path) -> None:
    run_module("benchmarks.sweep_free", "--models", "seed_cnn", "--seeds", "1", "--train-size", "500", "--epochs",
               "1", "--out", str(tmp_path))  # fmt: skip
    (table,) = tmp_path.glob("*-sweep-free.md")
    (row,) = [line.split(" | ") for line in table.read_text().splitlines() if line.startswith("| seed_cnn |")]
    grid, control = (float(cell.rstrip("%")) for cell in row[2:4])  # one seed: no spread in brackets
    assert 0 < grid <= 100 and 0 < control <= 100
    assert row[5] == "5 / " + row[5].split(" / ")[1] and row[6].startswith("1 / ")  # 5 rates, 1 control, 1 epoch
    assert "The parent's verdict: The grid's best (optimizer.lr=" in table.read_text()


def test_precision_benchmark_runs_each_seed_in_both_precisions(tmp_path: Path) -> None:
    run_module("benchmarks.precision", "--seeds", "7", "--train-size", "500", "--epochs", "1", "--out", str(tmp_path))
    (table,) = tmp_path.glob("*-precision.md")
    rows = [line.split(" | ") for line in table.read_text().splitlines() if line.startswith("| ")]
    runs = [(r[0], r[1]) for r in rows if len(r) == 5 and r[1] == "7"]
    assert runs == [("| float32", "7"), ("| bfloat16", "7")]  # the tag each run recorded, in the order run
    assert "bfloat16 speed-up in model.fit:" in table.read_text()
