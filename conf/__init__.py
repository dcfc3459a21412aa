"""Hydra configs, packaged as fashion_sweep.conf so Hydra finds them from any install (see pyproject.toml)."""
