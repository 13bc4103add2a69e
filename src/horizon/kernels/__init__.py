"""Torch-facing kernel ops: each runs our CUDA kernel on a GPU (bf16, when the fatbin has it)
and its torch reference (which is also the test oracle) elsewhere. All are differentiable."""

from .activation import swiglu  # noqa: F401
from .cross_entropy import fused_linear_cross_entropy  # noqa: F401
from .grad import accumulate_grad_, all_finite, all_finite_tensor, grad_sq_norm  # noqa: F401
from .norm import rms_norm  # noqa: F401
from .rope import apply_rope, rope_cos_sin  # noqa: F401
