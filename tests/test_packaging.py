"""The package as users install it: a wheel carries conf/, and the console script answers Hydra's flags."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import ROOT, run_script


def test_wheel_carries_the_configs_and_hydra_finds_them(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("fashion_sweep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for yaml in ROOT.joinpath("conf").rglob("*.yaml"):
        assert f"fashion_sweep/conf/{yaml.relative_to(ROOT / 'conf')}" in names
    assert "hydra_plugins/fashion_sweep_halving/halving_sweeper.py" in names
    assert "hydra_plugins/__init__.py" not in names  # a namespace package, shared with Hydra's own plugins

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    compose = (
        "import sys, fashion_sweep, hydra\n"
        "assert fashion_sweep.__file__.startswith(sys.argv[1]), fashion_sweep.__file__\n"
        "with hydra.initialize_config_module(version_base='1.3', config_module='fashion_sweep.conf'):\n"
        "    cfg = hydra.compose('config', overrides=['experiment=lr_sweep', 'model=cnn_bn'])\n"
        "print(cfg.model.name, cfg.sweep_name)\n"
        "from hydra.core.plugins import Plugins\n"  # Hydra's own scan finds the sweeper in an installed wheel
        "from hydra.plugins.sweeper import Sweeper\n"
        "print(*sorted(c.__name__ for c in Plugins.instance().discover(Sweeper)))\n"
    )
    out = subprocess.run([sys.executable, "-c", compose, str(site)], env={"PYTHONPATH": str(site)}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cnn_bn", "lr_sweep", "BasicSweeper", "HalvingSweeper"]


def test_help_lists_the_config_groups(tmp_path: Path) -> None:
    proc = run_script("fashion-sweep", "--help", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0
    for line in ("model: cnn_bn, mlp, readme_cnn, seed_cnn", "control: none, sweep_free",
                 "optimizer: adam, adamw, rmsprop, schedule_free_adamw, sgd",
                 "experiment: best_cnn, lr_find, lr_sweep, optimizer_sweep"):  # fmt: skip
        assert line in proc.stdout


def test_cfg_job_prints_the_composed_config(tmp_path: Path) -> None:
    proc = run_script("fashion-sweep", "--cfg", "job", "model=mlp", "optimizer.lr=0.01", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "name: mlp" in proc.stdout and "lr: 0.01" in proc.stdout
    assert not (tmp_path / "mlruns").exists()  # printing the config runs nothing
