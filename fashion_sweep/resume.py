"""`fashion-sweep-resume [TARGET] [--tracking-uri URI] [--force] [hydra overrides]`: continue an interrupted
run or sweep where it stopped.

Owns choosing what to continue and whether that is safe. The continuing itself is the ordinary launch
(cli.py) with the overrides the run or sweep recorded when it started: each job then finds its own run
(continuation.existing_run) and goes on from its checkpoint, so every launcher works.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fashion_sweep import credentials, runs, store

OVERRIDE = re.compile(r"^[+~]{0,2}[\w./@-]+=")  # key=value as Hydra reads it; a run name has spaces before "="
PROG = "fashion-sweep-resume"


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """(TARGET or None, the overrides); refuses more than one target and overrides that change the jobs."""
    targets = [a for a in args if not OVERRIDE.match(a)]
    overrides = [a for a in args if OVERRIDE.match(a)]
    if len(targets) > 1:
        raise SystemExit(f"{PROG}: one TARGET at most, got {targets}")
    for override in overrides:
        if not override.lstrip("+~").startswith(("hydra.", "hydra/")):
            raise SystemExit(
                f"{PROG}: {override} would change the jobs; a resume takes only Hydra overrides (hydra.*, hydra/...)"
            )
    return (targets[0] if targets else None), overrides


def find_target(client: MlflowClient, target: str | None) -> Run | None:
    """The run or sweep named by target (run id, sweep id or run name); with None, the newest that did not finish.
    A name many runs share (every default run is 'seed_cnn rmsprop lr=0.001') means the newest of them that did not
    finish, else the newest."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if target is None:
        unfinished = client.search_runs(experiments, "attributes.status != 'FINISHED'", order_by=["start_time DESC"])
        for run in unfinished:
            candidate = runs.sweep_of(client, run)
            if not runs.is_done(candidate) and candidate.data.tags.get(runs.TASK_TAG) != "lr_find":
                return candidate
        return None
    try:
        return runs.sweep_of(client, client.get_run(target))
    except MlflowException:
        pass
    named = client.search_runs(experiments, f"attributes.run_name = '{target}'", order_by=["start_time DESC"])
    if not named:
        raise LookupError(f"no run or sweep {target!r} in the store")
    candidates = [runs.sweep_of(client, run) for run in named]
    return next((run for run in candidates if not runs.is_done(run)), candidates[0])


def still_alive(client: MlflowClient, run: Run) -> str | None:
    """Why run (or, for a sweep, its parent or one of its jobs) may still be running elsewhere."""
    children = runs.child_runs(client, run.info.experiment_id, run.info.run_id) if runs.is_sweep(run) else []
    reasons = (runs.still_alive(client, r) for r in [run, *children])
    return next((reason for reason in reasons if reason), None)


def without_secrets(overrides: list[str], uri: str) -> list[str]:
    """overrides with a store URI that carries a secret (recorded by an older fashion-sweep, which took one) or a
    redacted one (***) replaced by uri, the store this resume reads, whose credentials are in the environment."""
    kept = []
    for override in overrides:
        key, _, value = override.partition("=")
        if credentials.has_secret(value):
            print(
                f"{PROG}: {key} as recorded holds a password; continuing with {uri} (credentials from the environment)"
            )
            override = f"{key}={uri}"
        kept.append(override)
    return kept


def launch_argv(run: Run, extra: list[str], uri: str) -> tuple[list[str], Path]:
    """The `fashion-sweep` arguments that launched run, with extra Hydra overrides, and the directory to run in.
    A recorded store URI with a password becomes uri."""
    if runs.LAUNCH_TAG not in run.data.tags:
        raise SystemExit(f"{PROG}: run {run.info.run_id} records no launch (written by an older fashion-sweep)")
    record = json.loads(run.data.tags[runs.LAUNCH_TAG])

    def key(override: str) -> str:
        return override.lstrip("+~").split("=", 1)[0]

    if runs.is_sweep(run) and record.get("sweep_dir") and "hydra.sweep.dir" not in map(key, extra):
        extra = [*extra, f"hydra.sweep.dir={record['sweep_dir']}"]  # the same folder: the report lands where it was
    replaced = {key(o) for o in extra}
    kept = [o for o in record["hydra_overrides"] if key(o) not in replaced]
    flags = ["--multirun"] if runs.is_sweep(run) else []
    cwd = Path(record["cwd"])
    return [*flags, *without_secrets(record["overrides"], uri), *kept, *extra], cwd if cwd.is_dir() else Path.cwd()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Continue an interrupted run or sweep from its last checkpoint, in the same MLflow runs.",
    )
    parser.add_argument(
        "args", nargs="*", metavar="[TARGET] [OVERRIDE]",
        help="a sweep's parent run id, a run id or a run name (default: the newest run or sweep that did not "
        "finish), then Hydra overrides such as hydra/launcher=joblib",
    )  # fmt: skip
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: ./mlruns/mlflow.db)")
    parser.add_argument("--force", action="store_true", help="resume even if a RUNNING run may still be alive")
    args = parser.parse_args(argv)
    target, extra = split_args(args.args)

    uri = credentials.moved_to_environment(args.tracking_uri or store.default_tracking_uri())
    if missing := store.missing_local_store(uri):
        sys.exit(f"{PROG}: {missing}; pass --tracking-uri")

    client = MlflowClient(uri)
    try:
        run = find_target(client, target)
        alive = None if args.force or run is None or runs.is_done(run) else still_alive(client, run)
    except LookupError as err:
        sys.exit(f"{PROG}: {err} ({uri})")
    except MlflowException as err:
        sys.exit(f"{PROG}: {credentials.server_refusal(err) or runs.error_summary(err)} ({uri})")
    if run is None:
        print(f"{PROG}: nothing to resume: every run and sweep in {uri} finished")
        return
    if run.data.tags.get(runs.TASK_TAG) == "lr_find":
        sys.exit(f"{PROG}: an LR range test is not resumed; run it again")
    what = f"{'sweep' if runs.is_sweep(run) else 'run'} {run.info.run_name!r} ({run.info.run_id})"
    if runs.is_done(run):
        print(f"{PROG}: nothing to resume: {what} is {run.info.status}")
        return
    if alive:
        sys.exit(f"{PROG}: not resumed: {alive}; pass --force if you know it is gone")

    launch, cwd = launch_argv(run, extra, uri)
    print(f"{PROG}: continuing {what} in {cwd}", flush=True)
    os.environ[runs.RESUME_SWEEP_ENV if runs.is_sweep(run) else runs.RESUME_RUN_ENV] = run.info.run_id
    os.chdir(cwd)
    sys.argv = ["fashion-sweep", *launch]
    from fashion_sweep import cli  # Hydra's app: only once there is something to resume

    cli.main()


if __name__ == "__main__":
    main()
