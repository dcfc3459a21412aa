"""Placeholder replaced below."""
from hydra.experimental.callback import Callback


class MlflowSweep(Callback):
    pass
