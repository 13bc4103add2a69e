"""Rotary position embedding (HF layout and rotate_half convention) with its backward: the
torch reference (CPU path and oracle) and the CUDA kernel `horizon_rope` (bf16); and the
rotary tables of every RoPE scaling type transformers has for the native families
(`RopeSpec`, `rope_inv_freq`, `RotaryEmbedding`).

The scaled types compute the inverse frequencies and the attention scaling (which multiplies
cos and sin, as transformers does) with the formulas of transformers' `modeling_rope_utils`,
in the same fp32 operation order so the tables agree to rounding:

- `linear`: inv_freq / factor.
- `dynamic` (NTK): the base grows with the sequence length once it exceeds
  max_position_embeddings; stateful exactly as transformers' rotary module (grows with the
  longest batch seen, resets when a batch fits the original length again): `RotaryEmbedding`.
- `yarn`: interpolation / extrapolation blended by a linear ramp between the correction dims of
  beta_fast and beta_slow (optionally not truncated), attention factor from `attention_factor`
  or 0.1 ln(factor) + 1 (with mscale / mscale_all_dim as a ratio).
- `longrope`: per-dimension short / long factors, long once the batch's longest position is past
  original_max_position_embeddings; attention factor sqrt(1 + ln(factor) / ln(original)).
- `llama3`: low frequencies / factor, high ones kept, the band between smoothly blended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import native
from ..errors import HorizonError
from ._common import check_tensor, device_sms, out_empty, ptr, same_device, use_kernel

_ROPE = "horizon_rope"
_THREADS = 256


def rope_cos_sin(positions, head_dim: int, theta: float, dtype=torch.float32, device=None):
    """HF default rope tables: (cos, sin), each [1, S, head_dim] for 1-D positions [S], or
    [B, S, head_dim] for 2-D positions [B, S]."""
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise HorizonError(f"rope_cos_sin: head_dim must be a positive even int, got {head_dim!r}")
    if not isinstance(theta, (int, float)) or not theta > 0:
        raise HorizonError(f"rope_cos_sin: theta must be positive, got {theta!r}")
    pos = torch.as_tensor(positions, device=device)
    if pos.dim() not in (1, 2):
        raise HorizonError(f"rope_cos_sin: positions must be 1-D [S] or 2-D [B, S], got shape {tuple(pos.shape)}")
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    dev = pos.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=dev).float() / head_dim))
    freqs = pos.float().unsqueeze(-1) * inv_freq  # [B, S, D/2], fp32 as HF (autocast off)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    """One model's rotary embedding: the type and the parameters its formula reads."""

    rope_type: str
    theta: float
    head_dim: int
    max_position_embeddings: int
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    short_factor: tuple | None = None
    long_factor: tuple | None = None

    @classmethod
    def from_parameters(cls, params: dict, *, head_dim: int, max_position_embeddings: int,
                        where: str = "config.json: rope_parameters") -> "RopeSpec":
        """Validates a transformers `rope_parameters` dict (or a pre-5 `rope_scaling` one with
        `rope_theta` added). One-line HorizonError naming the bad key otherwise."""
        if not isinstance(params, dict):
            raise HorizonError(f"{where} must be a dict, got {type(params).__name__}")
        rope_type = params.get("rope_type", params.get("type")) or "default"
        if rope_type not in ROPE_TYPES:
            raise HorizonError(f"{where}: rope_type {rope_type!r} not supported (supported: {', '.join(ROPE_TYPES)})")

        def number(key, *, required=False, positive=True, default=None):
            value = params.get(key, default)
            if value is None:
                if required:
                    raise HorizonError(f"{where}: rope_type {rope_type!r} needs {key}")
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or (positive and value <= 0):
                raise HorizonError(f"{where}: {key} must be a {'positive ' if positive else ''}number, got {value!r}")
            return float(value)

        theta = number("rope_theta", required=True)
        partial = number("partial_rotary_factor", default=1.0)
        if partial != 1.0:
            raise HorizonError(
                f"{where}: partial_rotary_factor {params['partial_rotary_factor']!r} not supported "
                "(the native families rotate the whole head; only 1.0)"
            )
        fields = dict(rope_type=rope_type, theta=theta, head_dim=int(head_dim),
                      max_position_embeddings=int(max_position_embeddings))
        if rope_type in ("linear", "dynamic"):
            fields["factor"] = number("factor", required=True)
        elif rope_type in ("yarn", "longrope", "llama3"):
            original = params.get("original_max_position_embeddings")
            if original is None:
                original = max_position_embeddings  # transformers' standardisation does the same
            if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
                raise HorizonError(
                    f"{where}: original_max_position_embeddings must be a positive integer, got {original!r}"
                )
            fields["original_max_position_embeddings"] = original
            fields["factor"] = number("factor", required=rope_type == "llama3")
            if rope_type in ("yarn", "longrope"):
                fields["attention_factor"] = number("attention_factor", positive=False)
                if fields["attention_factor"] is not None and fields["attention_factor"] < 0:
                    raise HorizonError(f"{where}: attention_factor must be >= 0, got {params['attention_factor']!r}")
        if rope_type == "yarn":
            for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
                fields[key] = number(key, positive=False)
            truncate = params.get("truncate", True)
            if truncate not in (True, False):
                raise HorizonError(f"{where}: truncate must be true or false, got {truncate!r}")
            fields["truncate"] = bool(truncate)
        elif rope_type == "llama3":
            fields.update(low_freq_factor=number("low_freq_factor", required=True),
                          high_freq_factor=number("high_freq_factor", required=True))
            if fields["high_freq_factor"] == fields["low_freq_factor"]:
                raise HorizonError(f"{where}: high_freq_factor must differ from low_freq_factor, "
                                   f"both are {params['low_freq_factor']!r}")
        elif rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                value = params.get(key)
                if not isinstance(value, (list, tuple)) or len(value) != head_dim // 2 or not all(
                    not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0 for v in value
                ):
                    raise HorizonError(f"{where}: {key} must be a list of {head_dim // 2} positive numbers "
                                       f"(head_dim / 2), got {value!r}")
                fields[key] = tuple(float(v) for v in value)
        return cls(**fields)


def _arange_inv_freq(theta, dim: int, device=None) -> torch.Tensor:
    # 1 / theta^(2i/dim), fp32 (theta may be a 0-dim fp32 tensor: the dynamic type).
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(rope: RopeSpec, *, seq_len: int | None = None, device=None) -> tuple:
    """(inv_freq [head_dim / 2] fp32, attention_scaling) for `rope`. `seq_len` (the longest
    position + 1 of the batch) matters to `dynamic` and `longrope` only; None is the table a
    model starts with (transformers' init)."""
    dim = rope.head_dim
    t = rope.rope_type
    if t == "default":
        return _arange_inv_freq(rope.theta, dim, device), 1.0
    if t == "linear":
        return _arange_inv_freq(rope.theta, dim, device) / rope.factor, 1.0
    if t == "dynamic":
        max_pos, factor = rope.max_position_embeddings, rope.factor
        if seq_len is None:  # python floats, as transformers at init
            base = rope.theta * ((factor * max_pos / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        else:  # a tensor in transformers' forward: fp32 arithmetic
            length = torch.maximum(torch.tensor(int(seq_len), dtype=torch.int64), torch.tensor(max_pos))
            base = rope.theta * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
            base = base.to(device) if device is not None else base
        return _arange_inv_freq(base, dim, device), 1.0
    if t == "yarn":
        return _yarn_inv_freq(rope, device)
    if t == "longrope":
        original = rope.original_max_position_embeddings
        factor = rope.factor if rope.factor is not None else rope.max_position_embeddings / original
        scaling = rope.attention_factor
        if scaling is None:
            scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        ext = rope.long_factor if seq_len and seq_len > original else rope.short_factor
        ext = torch.tensor(ext, dtype=torch.float32, device=device)
        shape = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        return 1.0 / (ext * rope.theta ** shape), scaling
    if t == "llama3":
        return _llama3_inv_freq(rope, device), 1.0
    raise HorizonError(f"rope_type {t!r} not supported (supported: {', '.join(ROPE_TYPES)})")


def _yarn_inv_freq(rope: RopeSpec, device) -> tuple:
    dim, base = rope.head_dim, rope.theta
    original = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else rope.max_position_embeddings / original
    scaling = rope.attention_factor
    if scaling is None:
        if rope.mscale and rope.mscale_all_dim:
            scaling = float(_yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim))
        else:
            scaling = _yarn_mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    def correction_dim(rotations):
        # The dimension whose wavelength makes `rotations` turns over the original context.
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a one-point ramp would divide by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: extrapolate (high frequencies kept), 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep, scaling


def _llama3_inv_freq(rope: RopeSpec, device) -> torch.Tensor:
    inv_freq = _arange_inv_freq(rope.theta, rope.head_dim, device)
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    context = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = context / low, context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding:
    """The rotary tables of one model over training, with transformers' per-forward state:
    `dynamic` recomputes its frequencies when a batch is longer than any before it (past
    max_position_embeddings) and returns to the original ones when a batch fits the original
    length again; `longrope` picks its long factors for a batch whose longest position is past
    original_max_position_embeddings. The other types are fixed tables."""

    def __init__(self, rope: RopeSpec):
        self.rope = rope
        self.inv_freq, self.attention_scaling = rope_inv_freq(rope)
        self._original_inv_freq = self.inv_freq
        self._long_inv_freq = None
        self.max_seq_len_cached = rope.max_position_embeddings
        self._original_max_seq_len = rope.max_position_embeddings

    def update(self, seq_len: int) -> None:
        """Before a forward over positions whose largest is seq_len - 1."""
        t = self.rope.rope_type
        if t == "dynamic":
            cached = self.max_seq_len_cached
            if seq_len > cached:  # growth
                self.inv_freq, self.attention_scaling = rope_inv_freq(self.rope, seq_len=seq_len)
                self.max_seq_len_cached = seq_len
            if seq_len < self._original_max_seq_len and cached > self._original_max_seq_len:  # reset
                self.inv_freq = self._original_inv_freq
                self.max_seq_len_cached = self._original_max_seq_len
        elif t == "longrope":
            original = self.rope.original_max_position_embeddings
            if self._long_inv_freq is None:
                self._long_inv_freq, _ = rope_inv_freq(self.rope, seq_len=original + 1)
            self.inv_freq = self._long_inv_freq if seq_len > original else self._original_inv_freq

    def cos_sin(self, positions: torch.Tensor, dtype=torch.float32, device=None) -> tuple:
        """(cos, sin) [B, S, head_dim] for integer positions [B, S] (fp32 math, then `dtype`),
        each multiplied by the attention scaling; the current frequencies (see `update`)."""
        pos = positions.to(device) if device is not None else positions
        freqs = pos.float().unsqueeze(-1) * self.inv_freq.to(device=pos.device, dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rotate_half_t(x):
    # The transpose of rotate_half: (z1, z2) -> (z2, -z1).
    h = x.shape[-1] // 2
    return torch.cat((x[..., h:], -x[..., :h]), dim=-1)


def rope_reference(x, cos, sin):
    """x [B, nh, S, D]; cos/sin [B or 1, S, D] -> x*cos + rotate_half(x)*sin (HF)."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * c + _rotate_half(x) * s


def rope_backward_reference(g, cos, sin):
    """The transpose of rope_reference applied to g (valid for any cos/sin, not only HF's
    duplicated halves). The formula the CUDA kernel's backward mode implements."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return g * c + _rotate_half_t(g * s)


def _rope_launch(x, cos, sin, backward: bool):
    """One launch: out (new, contiguous) = rope(x) or its transpose. x may be a strided view
    whose last dim is contiguous (e.g. [B, S, nh, D].transpose(1, 2))."""
    B, NH, S, D = x.shape
    out = out_empty((B, NH, S, D), dtype=x.dtype, device=x.device)
    rows = B * NH * S
    if rows == 0:
        return out
    cos_sb = 0 if cos.shape[0] == 1 else S * D
    work = rows * (D // 2 + 7) // 8
    grid = max(1, min(device_sms(x) * 16, (work + _THREADS - 1) // _THREADS))
    native.launch(
        _ROPE,
        (grid,),
        (_THREADS,),
        [
            ptr(out), ptr(x), ptr(cos), ptr(sin),
            ("i32", B), ("i32", NH), ("i32", S), ("i32", D),
            ("i64", x.stride(0)), ("i64", x.stride(1)), ("i64", x.stride(2)),
            ("i64", cos_sb), ("i32", 1 if backward else 0),
        ],
        device=x.device,
    )
    return out


def _fast(x, cos, sin) -> bool:
    return (
        x.is_cuda and x.dtype == torch.bfloat16 and x.stride(-1) == 1
        and use_kernel(_ROPE, cos, sin)
    )


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        outs = []
        for x in (q, k):
            outs.append(_rope_launch(x, cos, sin, False) if _fast(x, cos, sin) else rope_reference(x, cos, sin))
        return tuple(outs)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        grads = []
        for g in (dq, dk):
            if g is None:
                grads.append(None)
            elif _fast(g, cos, sin):
                grads.append(_rope_launch(g, cos, sin, True))
            else:
                grads.append(rope_backward_reference(g, cos, sin))
        return grads[0], grads[1], None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """HF apply_rotary_pos_emb with unsqueeze_dim=1: q [B, nq, S, D], k [B, nk, S, D],
    cos/sin [B or 1, S, D]. Returns new (q, k); differentiable in q and k (not cos/sin)."""
    for name, t in (("q", q), ("k", k)):
        check_tensor(f"apply_rope: {name}", t, dims=4)
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(f"apply_rope: {name}", t, dims=3)
    B, _, S, D = q.shape
    if k.shape[0] != B or k.shape[2] != S or k.shape[3] != D:
        raise HorizonError(f"apply_rope: k shape {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if D % 2:
        raise HorizonError(f"apply_rope: head dim must be even, got {D}")
    if cos.shape != sin.shape or cos.shape[1:] != (S, D) or cos.shape[0] not in (1, B):
        raise HorizonError(
            f"apply_rope: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must be [1 or {B}, {S}, {D}]"
        )
    same_device("apply_rope", q, k, cos, sin)
    if cos.dtype != q.dtype:
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return RoPEFunction.apply(q, k, cos.contiguous(), sin.contiguous())
