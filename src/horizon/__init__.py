"""Horizon: train large language models on one GPU node with host RAM as the home of the model.

The compiled core is ``horizon._native`` (Rust); this package is the torch-facing side. The
public surface is `__all__`: `Trainer`, `HorizonError`, and the submodules `optim` (CPUAdamW),
`moe` (flash_moe), `kernels`, `store`, `distributed`, `run` (the `horizon train` loop as a
library); the heavy ones (torch) load on first use, so `horizon --help` does not wait for them.
Where things live: docs/architecture.md.
"""

from __future__ import annotations

__version__ = "0.1.0"

import os as _os
import sys as _sys
from typing import TYPE_CHECKING as _TYPE_CHECKING

# On the CPU device torch's OpenMP threads share the cores with our pipeline and AdamW
# threads; libgomp's default spin (300k iterations before a waiting thread sleeps) then burns
# the cores those threads need. A shorter spin cost nothing on an idle 2-core machine and
# halved step time under load (`horizon train --steps 20` with two busy loops beside it:
# 23.8 s -> 11.4 s). Only set when torch (hence libgomp) is not loaded yet and the user has
# not chosen a value.
if "torch" not in _sys.modules:
    _os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from .errors import HorizonError  # noqa: E402

if _TYPE_CHECKING:  # what the lazy attributes below resolve to, for type checkers and IDEs
    from . import distributed, kernels, moe, optim, run, store  # noqa: F401
    from .trainer import Trainer  # noqa: F401

_LAZY_SUBMODULES = ("optim", "moe", "kernels", "store", "distributed", "run")
__all__ = ["HorizonError", "Trainer", "__version__", *_LAZY_SUBMODULES]


def __getattr__(name):
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'horizon' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
