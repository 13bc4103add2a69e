"""CPU AdamW on the Rust core: the fused in-place step over flat host buffers (what the engine
calls on its layer slabs, with the bf16 compute copy written in the same pass), the gradient
reductions used for clipping, and `CPUAdamW`, a drop-in `torch.optim.Optimizer` for fp32 CPU
parameters.

The update is torch.optim.AdamW's (decoupled weight decay, bias correction), with an extra
`grad_scale` that multiplies the gradient first (clipping without a separate pass). Results do
not depend on the SIMD path or the thread count (bit-identical); the native call releases the
GIL while it runs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _native
from .errors import HorizonError

__all__ = ["CPUAdamW", "fused_adamw_", "grad_sq_norm", "all_finite", "adam_config"]

# From this many elements on, CPUAdamW keeps a moment in a mapping of Horizon's host arena
# (page-aligned, huge pages requested, pre-faulted in parallel) rather than torch's allocator:
# the step streams through it with fewer TLB misses. Smaller tensors would waste a page each.
STATE_IN_ARENA_MIN = 1 << 16


def _check_tensor(fn: str, name: str, t, dtype: torch.dtype, numel: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise HorizonError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise HorizonError(f"{fn}: {name} is a {t.layout} tensor; only dense (strided) tensors are supported")
    if t.device.type != "cpu":
        raise HorizonError(f"{fn}: {name} is on {t.device}; CPU AdamW needs CPU tensors")
    if t.dtype != dtype:
        raise HorizonError(f"{fn}: {name} has dtype {t.dtype}; expected {dtype}")
    if not t.is_contiguous():
        raise HorizonError(f"{fn}: {name} is not contiguous (shape {tuple(t.shape)}, stride {t.stride()})")
    if numel is not None and t.numel() != numel:
        raise HorizonError(f"{fn}: {name} has {t.numel()} elements; expected {numel} (as param)")


def _hyper_of(group: dict) -> "_native.AdamW":
    """A param group's hyper-parameters as one validated `_native.AdamW` (the one rule)."""
    betas = group["betas"]
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    return _native.AdamW(group["lr"], b1, b2, group["eps"], group["weight_decay"])


def fused_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    hyper: "_native.AdamW",
    step: int,
    grad_scale: float = 1.0,
    bf16_out: Optional[torch.Tensor] = None,
) -> None:
    """In place: one AdamW step with the hyper-parameters `hyper` (a `horizon._native.AdamW`,
    validated when it was made) on `param`, `exp_avg`, `exp_avg_sq` from `grad * grad_scale`;
    `bf16_out` (optional) receives the new parameters rounded to bf16 (nearest even).

    All tensors are contiguous CPU tensors of `param`'s numel: fp32, and bf16 for `bf16_out`;
    they must not overlap. `step` is the 1-based number of the step being taken.
    """
    fn = "fused_adamw_"
    _check_tensor(fn, "param", param, torch.float32)
    n = param.numel()
    _check_tensor(fn, "grad", grad, torch.float32, n)
    _check_tensor(fn, "exp_avg", exp_avg, torch.float32, n)
    _check_tensor(fn, "exp_avg_sq", exp_avg_sq, torch.float32, n)
    if bf16_out is not None:
        _check_tensor(fn, "bf16_out", bf16_out, torch.bfloat16, n)
    if not isinstance(hyper, _native.AdamW):
        raise HorizonError(f"{fn}: hyper must be a horizon._native.AdamW, got {type(hyper).__name__}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"{fn}: step must be an int >= 1 (the step being taken), got {step!r}")
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)) or not math.isfinite(grad_scale):
        raise ValueError(f"{fn}: grad_scale must be a finite number, got {grad_scale!r}")
    if n == 0:
        return
    _native.adamw_step_raw(
        param.data_ptr(),
        grad.data_ptr(),
        exp_avg.data_ptr(),
        exp_avg_sq.data_ptr(),
        0 if bf16_out is None else bf16_out.data_ptr(),
        n,
        hyper=hyper,
        step=step,
        grad_scale=float(grad_scale),
    )


def grad_sq_norm(t: torch.Tensor) -> float:
    """Sum of the squares of a contiguous fp32 CPU tensor, accumulated in f64 in a fixed order
    (the same result for any thread count). The global norm is sqrt of the sum over tensors."""
    _check_tensor("grad_sq_norm", "t", t, torch.float32)
    if t.numel() == 0:
        return 0.0
    return float(_native.grad_sq_norm_raw(t.data_ptr(), t.numel()))


def all_finite(t: torch.Tensor) -> bool:
    """True when a contiguous fp32 CPU tensor holds no inf and no NaN."""
    _check_tensor("all_finite", "t", t, torch.float32)
    if t.numel() == 0:
        return True
    return bool(_native.all_finite_raw(t.data_ptr(), t.numel()))


def adam_config() -> dict:
    """The SIMD level and the worker threads the native steps run with."""
    simd, threads = _native.adam_config()
    return {"simd": simd, "threads": int(threads)}


class CPUAdamW(torch.optim.Optimizer):
    """AdamW for fp32 CPU parameters, computed by Horizon's fused multithreaded SIMD kernel.

    A drop-in for ``torch.optim.AdamW(params, lr, betas, eps, weight_decay)``: same update,
    same state keys (``step``, ``exp_avg``, ``exp_avg_sq``), so state dicts move between the two;
    param groups carry their own hyper-parameters, each group's checked as one
    ``horizon._native.AdamW`` (the one rule; a bad value is a one-line ValueError) when it is
    added and at every step. AMSGrad and ``maximize`` are not supported.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        _hyper_of(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _hyper_of(group)
        for i, p in enumerate(group["params"]):
            where = f"param {i} of group {len(self.param_groups) - 1}"
            if p.layout != torch.strided:
                raise HorizonError(f"CPUAdamW: {where} is a {p.layout} tensor; only dense tensors are supported")
            if p.device.type != "cpu":
                raise HorizonError(f"CPUAdamW: {where} is on {p.device}; CPUAdamW needs CPU parameters")
            if p.dtype != torch.float32:
                raise HorizonError(f"CPUAdamW: {where} has dtype {p.dtype}; CPUAdamW needs float32 parameters")

    @staticmethod
    def _zeros(p: torch.Tensor) -> torch.Tensor:
        n = p.numel()
        if n < STATE_IN_ARENA_MIN:
            return torch.zeros(p.shape, dtype=torch.float32)
        # A fresh anonymous mapping reads as zeros; the tensor keeps the mapping alive.
        region = _native.HostRegion(n * 4)
        return torch.from_dlpack(region.dlpack(0, n, "float32")).view(p.shape)

    def _state_for(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = self._zeros(p)
            state["exp_avg_sq"] = self._zeros(p)
        for key in ("exp_avg", "exp_avg_sq"):
            s = state[key]
            # A loaded state dict may hold other layouts; the kernel wants dense fp32 CPU.
            if s.dtype != torch.float32 or s.device.type != "cpu" or not s.is_contiguous() or s.shape != p.shape:
                if s.numel() != p.numel():
                    raise HorizonError(f"CPUAdamW: state {key!r} has {s.numel()} elements; its param has {p.numel()}")
                state[key] = s.detach().to(device="cpu", dtype=torch.float32).contiguous().view(p.shape)
        if not isinstance(state["step"], torch.Tensor):
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            if group.get("amsgrad", False) or group.get("maximize", False):
                raise HorizonError(f"CPUAdamW: group {gi} asks for amsgrad/maximize, which CPUAdamW does not support")
            hyper = _hyper_of(group)  # a scheduler may have changed the group since
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse or g.layout != torch.strided:
                    raise HorizonError("CPUAdamW does not support sparse gradients")
                if g.device.type != "cpu" or g.dtype != torch.float32:
                    raise HorizonError(f"CPUAdamW: gradient is {g.dtype} on {g.device}; expected float32 on CPU")
                if g.shape != p.shape:
                    raise HorizonError(f"CPUAdamW: gradient shape {tuple(g.shape)} differs from param {tuple(p.shape)}")
                state = self._state_for(p)
                state["step"] += 1
                step = int(state["step"].item())
                target = p if p.is_contiguous() else p.contiguous()
                fused_adamw_(
                    target,
                    g.contiguous(),
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    hyper=hyper,
                    step=step,
                )
                if target is not p:
                    p.copy_(target)
        return loss


# ----------------------------------------------------------------------------- options
from dataclasses import dataclass  # noqa: E402

from .options import ConfigError, check_fields, flag, option  # noqa: E402


@dataclass
class OptimizerConfig:
    """AdamW's hyper-parameters and gradient clipping: the defaults of `horizon train` and of
    `horizon.Trainer` alike. `lr` is the peak of the schedule (the run's `ScheduleConfig` decays
    it)."""

    lr: float = option(2e-3, "peak learning rate", gt=0.0, metavar="LR")
    beta1: float = option(0.9, "AdamW beta1, in [0, 1)", metavar="B1")
    beta2: float = option(0.95, "AdamW beta2, in [0, 1)", metavar="B2")
    eps: float = option(1e-8, "AdamW epsilon, > 0", metavar="EPS")
    weight_decay: float = option(0.0, "decoupled AdamW weight decay, >= 0", metavar="WD")
    grad_clip: float | None = option(None, "clip the global gradient norm to this value", gt=0.0, metavar="NORM",
                                     default_help="off")

    def __post_init__(self):
        check_fields(self)  # types; the peak lr > 0; grad_clip > 0
        self.adamw()  # the ranges of AdamW's own values: the native object's rule, the only one

    def adamw(self) -> "_native.AdamW":
        """The hyper-parameter object the Rust AdamW takes whole (at the peak lr)."""
        try:
            return _native.AdamW(self.lr, self.beta1, self.beta2, self.eps, self.weight_decay)
        except ValueError as e:  # "beta2 (betas[1]) must be ..." -> "--beta2 must be ..."
            name, _, rest = str(e).partition(" must be ")
            name = name.split(" ")[0]
            raise ConfigError(f"{flag(name)} must be {rest}", name) from None

    @property
    def betas(self) -> tuple:
        return (self.beta1, self.beta2)
