"""Horizon: train large language models on one GPU node with host RAM as the home of the model.

The compiled core is ``horizon._native`` (Rust); this package is the torch-facing side.
"""

__version__ = "0.1.0"

from .errors import HorizonError  # noqa: F401


_SUBMODULES = ("optim", "moe", "kernels", "store", "distributed")


def __getattr__(name):
    # Heavy submodules (torch) load on first use so `horizon --help` stays fast.
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'horizon' has no attribute {name!r}")
