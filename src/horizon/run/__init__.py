"""A training run as a product: options (`config.py`, `schedule.py`), set-up (`session.py`), the
loop (`loop.py`), records and display (`metrics.py`, `progress.py`), checkpoint and resume
(`resume.py`), export (`export.py`)."""

from .config import TrainConfig
from .export import export
from .loop import train

__all__ = ["TrainConfig", "export", "train"]
