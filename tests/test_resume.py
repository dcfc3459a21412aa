"""Interrupted runs and sweeps continued by `fashion-sweep-resume`: real processes killed for real, a real store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fashion_sweep import resume as resume_script
from tests.conftest import BIN, all_runs, interruptible, run_script, store_uri

EPOCH_METRICS = ["loss", "accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds"]
SAME_TRAINING = ["loss", "accuracy", "val_loss", "val_accuracy", "lr"]  # epoch_seconds is a wall-clock time


def launch(tmp: Path, *args: str) -> subprocess.Popen:
    """`fashion-sweep` in its own process group (so a test can kill it and its workers), output in a pipe."""
    command = [str(BIN / "fashion-sweep"), *args, f"tracking.uri={store_uri(tmp / 'mlruns')}",
               f"tracking.artifact_location={tmp / 'mlruns' / 'artifacts'}", f"hydra.run.dir={tmp}/out",
               f"hydra.sweep.dir={tmp}/multirun", "trainer.verbose=2", "tracking.log_model=false"]  # fmt: skip
    return subprocess.Popen(command, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=interruptible)  # fmt: skip


def stop_after(proc: subprocess.Popen, marker: str, count: int, signum: int) -> str:
    """Read the output until marker has appeared count times, then send signum to the process group."""
    seen, lines = 0, []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            seen += marker in line
            if seen == count:
                os.killpg(proc.pid, signum)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return "".join(lines) + (rest or "")


def resume(tmp: Path, *args: str):
    return run_script("fashion-sweep-resume", *args, "--tracking-uri", store_uri(tmp / "mlruns"), cwd=tmp, timeout=300)


def history(tmp: Path, run: Run, metric: str) -> list[tuple[int, float]]:
    client = MlflowClient(store_uri(tmp / "mlruns"))
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))


def steps(tmp: Path, run: Run) -> dict[str, list[int]]:
    return {m: [step for step, _ in history(tmp, run, m)] for m in EPOCH_METRICS}


JOB = ["data.train_size=3000", "trainer.epochs=3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Run]:
    tmp = tmp_path_factory.mktemp("whole")
    proc = launch(tmp, *JOB)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    (run,) = all_runs(tmp)
    return tmp, run


def test_ctrl_c_run_resumed_in_place_equals_an_uninterrupted_run(tmp_path: Path, uninterrupted) -> None:
    output = stop_after(launch(tmp_path, *JOB, "tracking.system_metrics_interval=1"), "val_loss", 1, signal.SIGINT)
    assert "interrupted; run" in output and "Traceback" not in output
    (killed,) = all_runs(tmp_path)
    assert killed.info.status == "KILLED" and killed.data.tags["checkpoint_epoch"] in ("1", "2")

    proc = resume(tmp_path)  # no target: the newest run that did not finish
    assert proc.returncode == 0, proc.stderr
    (run,) = all_runs(tmp_path)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert steps(tmp_path, run) == {m: [1, 2, 3] for m in EPOCH_METRICS}  # every epoch logged exactly once
    cpu = [step for step, _ in history(tmp_path, run, "system/cpu_utilization_percentage")]
    assert len(cpu) >= 2 and cpu == list(range(len(cpu)))  # one series across the resume: steps go on, none twice
    whole_tmp, whole = uninterrupted
    for metric in SAME_TRAINING:  # deterministic on CPU: the same seed gives the same numbers, to the last bit
        assert history(tmp_path, run, metric) == history(whole_tmp, whole, metric), metric
    assert run.data.metrics["test_accuracy"] == whole.data.metrics["test_accuracy"]
    assert run.data.metrics["fit_seconds"] >= sum(v for _, v in history(tmp_path, run, "epoch_seconds"))

    again = resume(tmp_path, run.info.run_id)
    assert again.returncode == 0 and "nothing to resume" in again.stdout
    assert [r.info.run_id for r in all_runs(tmp_path)] == [run.info.run_id]


def sweep_runs(tmp: Path) -> tuple[Run, dict[str, Run]]:
    runs = all_runs(tmp)
    (parent,) = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    return parent, {r.data.params["optimizer.lr"]: r for r in runs if r is not parent}


SWEEP = ["--multirun", "optimizer.lr=0.0005,0.001,0.002", "data.train_size=2000", "trainer.epochs=3"]


def test_sweep_sigkilled_in_its_second_job_resumes_where_it_stopped(tmp_path: Path) -> None:
    stop_after(launch(tmp_path, *SWEEP), "val_loss", 4, signal.SIGKILL)  # job 2's first epoch has ended
    parent, jobs = sweep_runs(tmp_path)
    assert parent.info.status == "RUNNING" and sorted(jobs) == ["0.0005", "0.001"]
    first, second = jobs["0.0005"], jobs["0.001"]
    assert first.info.status == "FINISHED" and second.info.status == "RUNNING"  # what SIGKILL leaves behind

    proc = resume(tmp_path, parent.info.run_id)
    assert proc.returncode == 0, proc.stderr
    assert "| optimizer.lr | best_val_loss |" in proc.stdout  # the report, as after an uninterrupted sweep
    resumed, jobs = sweep_runs(tmp_path)
    assert resumed.info.run_id == parent.info.run_id and resumed.info.status == "FINISHED"
    assert sorted(jobs) == ["0.0005", "0.001", "0.002"] and len(all_runs(tmp_path)) == 4
    assert jobs["0.0005"].info.end_time == first.info.end_time  # job 1 untouched
    assert jobs["0.001"].info.run_id == second.info.run_id  # job 2 continued in its own run
    for job in jobs.values():
        assert job.info.status == "FINISHED"
        assert steps(tmp_path, job) == {m: [1, 2, 3] for m in EPOCH_METRICS}
    assert (tmp_path / "multirun" / "report" / "summary.csv").is_file()
    assert "best_lr" in resumed.data.params and not any(r.info.status == "RUNNING" for r in all_runs(tmp_path))
    (tested,) = [job for job in jobs.values() if "test_accuracy" in job.data.metrics]  # the selected one, once
    assert tested.data.params["optimizer.lr"] == resumed.data.params["best_lr"]


def test_a_sweep_killed_between_its_last_job_and_scoring_scores_the_selected_run_once_on_resume(tmp_path) -> None:
    two_jobs = ["--multirun", "optimizer.lr=0.001,0.003", "data.train_size=1000", "trainer.epochs=1"]
    stop_after(launch(tmp_path, *two_jobs), "finished (lowest validation loss", 2, signal.SIGKILL)  # 2nd run ended
    parent, jobs = sweep_runs(tmp_path)
    assert parent.info.status == "RUNNING" and {job.info.status for job in jobs.values()} == {"FINISHED"}
    assert not any("test_accuracy" in job.data.metrics for job in jobs.values())  # killed before the sweep scored

    proc = resume(tmp_path, parent.info.run_id)
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout + proc.stderr).count("Test set scored once, for the selected run") == 1
    resumed, jobs = sweep_runs(tmp_path)
    assert resumed.info.status == "FINISHED" and "test_accuracy" in resumed.data.metrics
    (tested,) = [job for job in jobs.values() if "test_accuracy" in job.data.metrics]
    assert tested.data.params["optimizer.lr"] == resumed.data.params["best_lr"]
    assert len(history(tmp_path, tested, "test_accuracy")) == 1
    assert resumed.data.metrics["test_accuracy"] == tested.data.metrics["test_accuracy"]


@pytest.mark.slow
def test_joblib_sweep_sigkilled_mid_training_resumes_under_joblib(tmp_path: Path) -> None:
    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    stop_after(launch(tmp_path, *SWEEP, *joblib), "val_loss", 2, signal.SIGKILL)
    parent, jobs = sweep_runs(tmp_path)
    assert parent.info.status == "RUNNING" and any(j.info.status == "RUNNING" for j in jobs.values())
    started = {lr: job.info.run_id for lr, job in jobs.items()}

    proc = resume(tmp_path)
    assert proc.returncode == 0, proc.stderr
    resumed, jobs = sweep_runs(tmp_path)
    assert resumed.info.status == "FINISHED" and len(jobs) == 3 and len(all_runs(tmp_path)) == 4
    assert all(jobs[lr].info.run_id == run_id for lr, run_id in started.items())
    for job in jobs.values():
        assert job.info.status == "FINISHED"
        assert steps(tmp_path, job) == {m: [1, 2, 3] for m in EPOCH_METRICS}


def test_resume_says_nothing_to_do_for_a_finished_sweep_and_creates_nothing(lr_sweep) -> None:
    tmp, _ = lr_sweep
    before = sorted(r.info.run_id for r in all_runs(tmp))
    parent = next(r for r in all_runs(tmp) if r.data.tags.get("sweep_role") == "parent")
    for target in ([parent.info.run_id], []):
        proc = resume(tmp, *target)
        assert proc.returncode == 0 and "nothing to resume" in proc.stdout, proc.stderr
    assert sorted(r.info.run_id for r in all_runs(tmp)) == before


def test_resume_refuses_an_unknown_target_and_config_overrides(lr_sweep) -> None:
    tmp, _ = lr_sweep
    unknown = resume(tmp, "no-such-run")
    assert unknown.returncode == 1 and "no run or sweep 'no-such-run' in the store" in unknown.stderr
    changed = resume(tmp, "optimizer.lr=0.1")
    assert changed.returncode != 0 and "would change the jobs" in changed.stderr
    assert "Traceback" not in unknown.stderr + changed.stderr


def test_a_run_name_many_runs_share_means_the_newest_of_them_that_did_not_finish(tmp_path: Path) -> None:
    (tmp_path / "mlruns").mkdir()
    client = MlflowClient(store_uri(tmp_path / "mlruns"))
    experiment = client.create_experiment("fashion-sweep", artifact_location=str(tmp_path / "artifacts"))
    name, now = "seed_cnn rmsprop lr=0.001", int(datetime.now(UTC).timestamp() * 1000)
    killed = client.create_run(experiment, start_time=now - 60_000, run_name=name).info.run_id
    client.set_terminated(killed, "KILLED")
    later = client.create_run(experiment, start_time=now, run_name=name).info.run_id
    client.set_terminated(later, "FINISHED")
    assert resume_script.find_target(client, name).info.run_id == killed  # not the newer, finished one
    client.set_terminated(killed, "FINISHED")
    assert resume_script.find_target(client, name).info.run_id == later  # all finished: the newest ("nothing to do")


def test_resume_refuses_a_running_run_whose_process_is_alive(tmp_path: Path) -> None:
    (tmp_path / "mlruns").mkdir()
    client = MlflowClient(store_uri(tmp_path / "mlruns"))
    experiment = client.create_experiment("fashion-sweep", artifact_location=str(tmp_path / "artifacts"))
    alive = {"host": socket.gethostname(), "pid": str(os.getpid()), "heartbeat": datetime.now(UTC).isoformat()}
    run = client.create_run(experiment, run_name="busy", tags={**alive, "launch": "{}"})
    proc = resume(tmp_path, run.info.run_id)
    assert proc.returncode == 1
    assert f"is RUNNING in process {os.getpid()} on this host" in proc.stderr and "--force" in proc.stderr
    assert client.get_run(run.info.run_id).info.status == "RUNNING"  # left as it was


def damage(run: Run, how: str) -> int:
    """Damage the run's current checkpoint slot (cut short), delete it, or both slots; return its epoch."""
    epoch = int(run.data.tags["checkpoint_epoch"])
    folder = Path(urlparse(run.info.artifact_uri).path) / "checkpoint"
    current, previous = folder / f"slot-{epoch % 2}.npz", folder / f"slot-{(epoch - 1) % 2}.npz"
    if how == "deleted":
        current.unlink()
    else:
        for slot in [current, previous] if how == "both cut short" else [current]:
            slot.write_bytes(slot.read_bytes()[:1000])
    return epoch


@pytest.mark.parametrize("how", ["cut short", "deleted"])
def test_a_damaged_or_missing_checkpoint_resumes_from_the_previous_one(tmp_path: Path, uninterrupted, how) -> None:
    stop_after(launch(tmp_path, *JOB), "val_loss", 2, signal.SIGINT)  # during epoch 3: checkpoints of 1 and 2
    (killed,) = all_runs(tmp_path)
    assert killed.info.status == "KILLED" and killed.data.tags["checkpoint_epoch"] == "2"
    epoch = damage(killed, how)

    proc = resume(tmp_path)
    assert proc.returncode == 0, proc.stderr
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "continuing from the previous one" in line]
    assert len(said) == 1 and f"after epoch {epoch - 1}" in said[0] and ("damaged" in said[0] or "missing" in said[0])
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert steps(tmp_path, run) == {m: [1, 2, 3] for m in EPOCH_METRICS}  # epoch 2 trained again, logged once
    whole_tmp, whole = uninterrupted
    for metric in SAME_TRAINING:  # epoch 2 retrained from epoch 1's checkpoint: the same numbers
        assert history(tmp_path, run, metric) == history(whole_tmp, whole, metric), metric


def test_with_no_whole_checkpoint_left_resume_says_how_to_start_afresh_and_changes_nothing(tmp_path: Path) -> None:
    stop_after(launch(tmp_path, *JOB), "val_loss", 2, signal.SIGINT)
    (killed,) = all_runs(tmp_path)
    damage(killed, "both cut short")

    proc = resume(tmp_path, killed.info.run_id)
    assert proc.returncode != 0
    refusal = proc.stderr.strip().splitlines()
    assert len(refusal) == 1 and "has no whole checkpoint left" in refusal[0], proc.stderr
    assert f"mlflow runs delete --run-id {killed.info.run_id}" in refusal[0]
    (run,) = all_runs(tmp_path)
    assert run.info.status == "KILLED"  # a refused resume leaves the run as it was
    assert steps(tmp_path, run)["loss"] == [1, 2]
