"""The execution engine: the layer-major schedule over streamed layers (`schedule`), the
host home of the model (`state`), checkpoints, memory accounting, and the weight / gradient
pipeline (`pipeline`)."""

from .schedule import LayerMajorEngine, StepResult  # noqa: F401
from .state import HostLayer, HostModel  # noqa: F401
