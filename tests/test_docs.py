"""The documentation holds: a short README, links that lead somewhere, and every command it shows is one that runs.

A `fashion-sweep` line in a code block of README.md or docs/ is composed as Hydra would compose each of its jobs and
checked as a job is before it runs (without the data, the store or TensorFlow); the other console scripts' lines
use only options their --help lists.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, open_dict

from fashion_sweep.config import validate

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]  # where commands are shown
MARKDOWN = [*PAGES, *sorted((ROOT / "benchmarks").rglob("*.md"))]  # where links are followed
README_MAX_LINES = 200

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`]*`")
SCRIPTS = ("fashion-sweep-compare", "fashion-sweep-resume", "fashion-sweep-ui", "fashion-sweep-server")
# Hydra's own command-line flags (hydra-core 1.3): those that take a value, and those that stand alone.
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                          "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc"}  # fmt: skip
HYDRA_FLAGS = {"--multirun", "-m", "--help", "-h", "--hydra-help", "--version", "--resolve", "--info", "-i"}
INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line outside fenced code blocks, inline code removed."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append((number, INLINE_CODE.sub("", line)))
    return lines


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line inside fenced code blocks, a line ending in a backslash joined with the
    next (numbered by its first line)."""
    found, fenced, pending, start = [], False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if FENCE.match(line):
            fenced, pending = not fenced, ""
            continue
        if not fenced:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        found.append((start, pending + line))
        pending = ""
    return found


def links() -> list:
    return [
        pytest.param(rel(path), number, target, id=f"{rel(path)}:{number}:{target}")
        for path in MARKDOWN
        for number, line in prose_lines(path)
        for target in LINK.findall(line)
        if not target.startswith(("http://", "https://", "mailto:"))
    ]


def command_words(line: str) -> list[str] | None:
    """The words of a shown command line (comments dropped, `.venv/bin/` and a `$ ` prompt stripped) if it runs one
    of the package's console scripts or `make sweep`; None for any other line."""
    text = line.strip().removeprefix("$ ")
    if not text.startswith((".venv/bin/fashion-sweep", "fashion-sweep", "make sweep")):
        return None
    words = shlex.split(text, comments=True)
    words[0] = words[0].removeprefix(".venv/bin/")
    return words


def commands() -> list:
    return [
        pytest.param(rel(path), number, words, id=f"{rel(path)}:{number}")
        for path in PAGES
        for number, line in code_lines(path)
        if (words := command_words(line)) is not None
    ]


def test_readme_is_read_in_five_minutes() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the reference goes to docs/"


def test_pages_are_found_and_show_commands() -> None:
    """The collection below is not empty by accident (a moved folder, a changed fence)."""
    assert {"README.md", "docs/using.md", "docs/configuration.md", "docs/records.md"} <= {rel(p) for p in PAGES}
    assert len(links()) > 20 and len(commands()) > 20


@pytest.mark.parametrize(("page", "line", "target"), links())
def test_relative_link_resolves(page: str, line: int, target: str) -> None:
    path = target.split("#", 1)[0]
    if not path:  # a link to a heading of the same page
        return
    assert (ROOT / page).parent.joinpath(path).exists(), f"{page}:{line} links to {target}, which does not exist"


def hydra_overrides(words: list[str]) -> tuple[list[str], bool]:
    """The Hydra overrides of a `fashion-sweep` (or `make sweep`) command line, and whether it is a --multirun."""
    if words[:2] == ["make", "sweep"]:
        extra = [w.removeprefix("ARGS=") for w in words[2:] if w.startswith("ARGS=")]
        return ["experiment=lr_sweep", *(o for e in extra for o in shlex.split(e))], True
    overrides, multirun, rest = [], False, iter(words[1:])
    for word in rest:
        if word in ("--multirun", "-m"):
            multirun = True
        elif word in HYDRA_FLAGS_WITH_VALUE:
            next(rest)
        elif word in HYDRA_FLAGS or word in INFO_VALUES:  # a flag alone, or --info's optional value
            continue
        elif word.startswith("-"):
            raise AssertionError(f"{word} is not a flag of fashion-sweep (a Hydra app)")
        else:
            overrides.append(word)
    return overrides, multirun


def composed(overrides: list[str]) -> DictConfig:
    return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def jobs_of(overrides: list[str], multirun: bool) -> tuple[list[list[str]], DictConfig]:
    """Every job of the command as Hydra's basic sweeper (and ours) expands it: the preset's hydra.sweeper.params,
    then the command line's sweeps; and the first job's composed config."""
    from fashion_sweep.halving import expand

    if not multirun:
        sweeps = [o.input_line for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()]
        assert not sweeps, f"{sweeps} sweep(s) without --multirun: Hydra refuses the line"
        return [overrides], composed(overrides)
    first = composed(expand(None, overrides)[0])
    jobs = expand(first.hydra.sweeper.get("params"), overrides)
    return jobs, composed(jobs[0])


@pytest.fixture(scope="module")
def halving_registered() -> None:
    from fashion_sweep.cli import register_plugins

    register_plugins()  # hydra/sweeper=halving, as the console script does before Hydra starts


@functools.cache
def help_text(script: str) -> str:
    done = subprocess.run(
        [str(Path(sys.executable).parent / script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{script} --help failed: {done.stderr}"
    return done.stdout


@pytest.mark.parametrize(("page", "line", "words"), commands())
def test_shown_command_runs(page: str, line: int, words: list[str], halving_registered: None) -> None:
    where = f"{page}:{line}: {shlex.join(words)}"
    if words[0] in SCRIPTS:
        options = [w.split("=", 1)[0] for w in words[1 : words.index("--") if "--" in words else None]]
        unknown = [o for o in options if o.startswith("-") and o not in help_text(words[0])]
        assert not unknown, f"{where}: {unknown} not in `{words[0]} --help`"
        return
    assert words[0] in ("fashion-sweep", "make"), f"{where}: {words[0]} is no console script of this package"
    from fashion_sweep.halving import check_plan

    try:
        overrides, multirun = hydra_overrides(words)
    except AssertionError as err:
        raise AssertionError(f"{where}: {err}") from None
    with initialize_config_module(version_base="1.3", config_module="fashion_sweep.conf"):
        try:
            jobs, first = jobs_of(overrides, multirun)
        except Exception as err:
            raise AssertionError(f"{where}: does not compose: {err}") from None
        if multirun:
            assert first.task != "lr_find", f"{where}: an LR range test is one run, refused with --multirun"
            if str(first.hydra.sweeper.get("_target_", "")).endswith(".HalvingSweeper"):
                sweeper = first.hydra.sweeper
                try:
                    check_plan(jobs, sweeper.eta, sweeper.min_epochs, first.trainer.epochs)
                except ValueError as err:
                    raise AssertionError(f"{where}: the halving sweeper refuses it: {err}") from None
        for job in jobs:
            try:
                cfg = composed(job)
                with open_dict(cfg):
                    choices = cfg.hydra.runtime.choices
                    del cfg["hydra"]
                validate(cfg, choices, build=False)
            except Exception as err:
                raise AssertionError(f"{where}: job {job} is refused: {err}") from None
