"""Hydra configs, packaged as fashion_sweep.conf so Hydra finds them from any install (see pyproject.toml).

Importing it registers the resolver the YAML uses: Hydra imports this package before it reads a config here.
"""

from omegaconf import OmegaConf

from fashion_sweep.backend import by_precision

OmegaConf.register_new_resolver("by_precision", by_precision, replace=True)
