"""The hf model path (DESIGN.md, "Two model paths"): any decoder-only causal LM in
transformers' registry, trained through transformers' own modules.

The model is built on the meta device from its config (`structure`); each decoder layer is a
parameterless template whose parameters are views of the streamed weight slot, and the
prologue (embedding, rotary, masks per layer type) and epilogue (final norm, head,
soft-capping) run the causal LM's own forward with shims in place of the layers
(`templates`). Checkpoint names and layouts are transformers' own (`names`). `select.resolve`
chooses between this path and the native one.
"""

from .select import MODEL_PATHS, ModelSummary, check_model_path, model_path_of, resolve, summarize  # noqa: F401
from .structure import Refusal  # noqa: F401
