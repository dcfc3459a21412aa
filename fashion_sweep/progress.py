"""How far a sweep is: the plan of its epochs, each job's place in it, and the time left.

Owns the line a job logs after every epoch and the `progress` tag of the sweep's parent run, so that the
terminal, the job's log file and the MLflow UI say the same. Whoever launches jobs writes the plan (tag
`progress_plan`): sweep.py for a grid, halving.py for each rung. Imports no TensorFlow.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from datetime import datetime

PLAN_TAG = "progress_plan"
PROGRESS_TAG = "progress"


@dataclass
class Plan:
    """The epochs a sweep trains, and which of them this stage's jobs train."""

    started: float  # time.time() when the sweep (or its resume) started
    total: int  # epochs the whole sweep trains, all jobs and stages
    done_before: int  # epochs of the sweep trained before this stage
    first_job: int  # Hydra's job number (hydra.job.num) of this stage's first job
    epochs: list[tuple[int, int]]  # per job of this stage: (epochs trained before it, epoch it trains up to)
    stage: str = ""  # e.g. "rung 2/3" in a halving sweep

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        fields = json.loads(text)
        return cls(**{**fields, "epochs": [tuple(pair) for pair in fields["epochs"]]})


def grid_plan(job_epochs: list[int], started: float) -> Plan:
    """A basic sweep: every job trains all its epochs, one stage."""
    return Plan(started, sum(job_epochs), 0, 0, [(0, epochs) for epochs in job_epochs])


def minutes(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 0):.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def describe(plan: Plan, job_num: int, epoch: int, now: float) -> str:
    """One line: stage, job i/n, epoch e/E, the share of the sweep's epochs done, and the time left for the whole
    sweep (elapsed time per epoch so far, start-up and evaluation included, times the epochs left)."""
    index = min(max(job_num - plan.first_job, 0), len(plan.epochs) - 1)
    before, stop = plan.epochs[index]
    done = plan.done_before + sum(b - a for a, b in plan.epochs[:index]) + epoch - before
    parts = [plan.stage] if plan.stage else []
    if len(plan.epochs) > 1 or plan.stage:
        parts.append(f"job {index + 1}/{len(plan.epochs)}")
    parts.append(f"epoch {epoch}/{stop}")
    if plan.total > 0 and done > 0:
        left = (now - plan.started) / done * max(plan.total - done, 0)
        ends = datetime.fromtimestamp(now + left).strftime("%H:%M")
        parts.append(f"{math.floor(100 * done / plan.total)}% done, ~{minutes(left)} left (~{ends})")
    return " · ".join(parts)


def single_run_plan(first_epoch: int, stop: int) -> Plan:
    """A run outside a sweep: its own epochs from now on."""
    return Plan(time.time(), stop - first_epoch, 0, 0, [(first_epoch, stop)])
