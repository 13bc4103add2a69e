"""The one exception type Horizon raises for bad input and failed operations."""

try:
    from ._native import HorizonError  # the native core raises the same class
except ImportError:  # pragma: no cover - only when the extension is not built

    class HorizonError(RuntimeError):
        """An error raised by Horizon."""
