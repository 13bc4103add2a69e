"""The Python side of every kernel launch against the kernel's C signature, on the CPU.

No GPU runs here, so a launch whose argument list disagrees with its kernel (a missing
pointer, an int passed where the kernel reads a long long) would only show up on a lent GPU,
as garbage or a fault. This test parses the `extern "C" __global__` signatures in cuda/, runs
every op's CUDA path with CPU tensors that report `is_cuda` (the launch itself recorded, not
executed), and checks each recorded launch: the kernel exists, the argument count and each
argument's kind match the parameter, and every pointer is a live tensor's address (or 0 for
an optional one)."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

from horizon import moe, native
from horizon.kernels import _common, norm
from horizon.kernels.moe import fused as moe_fused

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _balanced(src: str, i: int) -> int:
    """Index just past the parenthesised group that starts at src[i] == '('."""
    depth = 0
    for j in range(i, len(src)):
        depth += {"(": 1, ")": -1}.get(src[j], 0)
        if depth == 0:
            return j + 1
    raise ValueError("unbalanced parentheses")


def _kind(param: str) -> str:
    if "*" in param:
        return "ptr"
    words = param.replace("const", " ").split()[:-1]  # drop the parameter name
    base = " ".join(words)
    return {"long long": "i64", "int64_t": "i64", "int": "i32", "float": "f32", "unsigned": "u32",
            "unsigned int": "u32"}[base]


def kernel_signatures() -> dict:
    sigs = {}
    for f in sorted((ROOT / "cuda").rglob("*.cu")):
        src = re.sub(r"//[^\n]*", "", f.read_text())
        for m in re.finditer(r'extern\s+"C"\s+__global__\s+void\s+', src):
            i = m.end()
            if src.startswith("__launch_bounds__", i):
                i = _balanced(src, src.index("(", i))
            name = re.match(r"\s*(\w+)\s*", src[i:])
            j = i + name.end()
            params = src[j + 1 : _balanced(src, j) - 1]
            sigs[name.group(1)] = [_kind(p) for p in params.split(",") if p.strip()]
    return sigs


SIGS = kernel_signatures()


def test_signatures_parse_and_match_the_embedded_kernels():
    assert "horizon_flash_moe_fwd" in SIGS and "horizon_rmsnorm_fwd" in SIGS
    assert SIGS["horizon_acc_bf16_to_f32"] == ["ptr", "ptr", "f32", "i64"]
    built = native.system_info()["kernels"]
    if built:  # every kernel of the fatbin has a signature here, and the reverse
        assert {k["name"] for k in built} == set(SIGS)


class FakeCuda(torch.Tensor):
    """A CPU tensor that takes the ops' CUDA branch."""

    @property
    def is_cuda(self):
        return True


cooperative_calls = []  # (kernel, cooperative) of every recorded launch


@pytest.fixture
def launches(monkeypatch):
    calls = []
    live = []

    def record(kernel, grid, block, args, *, shared_mem=0, device=None, cooperative=False):
        calls.append((kernel, tuple(grid), tuple(block), list(args)))
        cooperative_calls.append((kernel, cooperative))

    cooperative_calls.clear()
    monkeypatch.setattr(native, "launch", record)
    monkeypatch.setattr(moe_fused, "_occupancy", lambda kernel, index: 3)
    monkeypatch.setattr(norm, "_bwd_blocks_per_sm", lambda H, index: 3)
    monkeypatch.setattr(native, "can_launch", lambda t, k: k in SIGS)
    monkeypatch.setattr(_common, "device_sms", lambda t: 4)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"multi_processor_count": 4})())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def fake(t):
        t = t.contiguous().as_subclass(FakeCuda)
        live.append(t)
        return t

    return calls, fake


def _check(calls):
    assert calls, "no launch was made: the CUDA path was not taken"
    for kernel, grid, block, args in calls:
        assert kernel in SIGS, f"{kernel} is not a kernel of cuda/"
        kinds = [a[0] for a in args]
        assert kinds == SIGS[kernel], f"{kernel}: launched with {kinds}, kernel takes {SIGS[kernel]}"
        for kind, value in args:
            if kind == "ptr":
                assert isinstance(value, int) and value >= 0
            elif kind in ("i32", "u32"):
                assert isinstance(value, int) and -(2**31) <= value < 2**32, (kernel, value)
            elif kind == "i64":
                assert isinstance(value, int)
            else:
                assert isinstance(value, float)
        assert all(d >= 1 for d in grid) and 1 <= block[0] <= 1024, (kernel, grid, block)


def test_layer_kernel_launches_match_their_signatures(launches):
    calls, fake = launches
    from horizon import kernels as K

    g = torch.Generator().manual_seed(0)
    x = fake(torch.randn(5, 64, generator=g).bfloat16()).requires_grad_()
    w = fake(torch.ones(64).bfloat16()).requires_grad_()
    y = K.rms_norm(x, w, 1e-5)
    torch.autograd.grad(y, (x, w), fake(torch.randn(5, 64, generator=g).bfloat16()))

    a = fake(torch.randn(3, 40, generator=g).bfloat16()).requires_grad_()
    b = fake(torch.randn(3, 40, generator=g).bfloat16()).requires_grad_()
    torch.autograd.grad(K.swiglu(a, b), (a, b), fake(torch.randn(3, 40, generator=g).bfloat16()))

    q = fake(torch.randn(1, 2, 7, 16, generator=g).bfloat16()).requires_grad_()
    k = fake(torch.randn(1, 2, 7, 16, generator=g).bfloat16()).requires_grad_()
    cos = fake(torch.randn(1, 7, 16, generator=g).bfloat16())
    sin = fake(torch.randn(1, 7, 16, generator=g).bfloat16())
    qo, ko = K.apply_rope(q, k, cos, sin)
    dq, dk = (fake(torch.randn(1, 2, 7, 16, generator=g).bfloat16()) for _ in range(2))
    torch.autograd.grad((qo, ko), (q, k), (dq, dk))

    h = fake(torch.randn(6, 32, generator=g).bfloat16()).requires_grad_()
    head = fake(torch.randn(50, 32, generator=g).bfloat16()).requires_grad_()
    labels = fake(torch.tensor([1, 2, -100, 4, 5, 6]))
    K.fused_linear_cross_entropy(h, head, labels, reduction="sum")

    for t in (fake(torch.randn(33, generator=g)), fake(torch.randn(33, generator=g).bfloat16())):
        K.grad_sq_norm(t)
        K.all_finite(t)
    K.accumulate_grad_(fake(torch.zeros(17)), fake(torch.randn(17, generator=g).bfloat16()), 0.5)

    assert not any(c for _, c in cooperative_calls)
    made = {c[0] for c in calls}
    for kernel in ("horizon_rmsnorm_fwd", "horizon_rmsnorm_bwd", "horizon_swiglu_fwd", "horizon_swiglu_bwd",
                   "horizon_rope", "horizon_sq_norm_partial_f32", "horizon_sq_norm_partial_bf16",
                   "horizon_nonfinite_f32", "horizon_nonfinite_bf16", "horizon_acc_bf16_to_f32"):
        assert kernel in made, f"{kernel} was not launched"
    assert made & {"horizon_ce_rows_bf16", "horizon_ce_rows_f32"}, "no cross-entropy kernel launched"
    _check(calls)


def test_flash_moe_launches_match_their_signatures(launches, monkeypatch):
    calls, fake = launches
    monkeypatch.setattr(moe_fused, "can_run", lambda *a, **k: True)
    g = torch.Generator().manual_seed(1)
    T, H, I, E, top_k = 9, 32, 48, 4, 2
    x = fake(torch.randn(T, H, generator=g).bfloat16()).requires_grad_()
    wr = fake(torch.randn(E, H, generator=g).bfloat16()).requires_grad_()
    w1 = fake(torch.randn(E, I, H, generator=g).bfloat16()).requires_grad_()
    w3 = fake(torch.randn(E, I, H, generator=g).bfloat16()).requires_grad_()
    w2 = fake(torch.randn(E, H, I, generator=g).bfloat16()).requires_grad_()
    y, aux = moe.flash_moe(x, wr, w1, w3, w2, top_k=top_k)
    dy = fake(torch.randn(T, H, generator=g).bfloat16())
    st = moe_fused.forward_torch(x.detach(), wr.detach(), w1.detach(), w3.detach(), w2.detach(), top_k, True, None)
    moe_fused.backward_kernel(st, dy, None, x.detach(), wr.detach(), w1.detach(), w3.detach(), w2.detach(), top_k, True)
    made = [c[0] for c in calls]
    assert "horizon_flash_moe_fwd" in made and "horizon_flash_moe_bwd" in made
    _check(calls)
    # The persistent kernels (blocks that wait for each other) launch cooperatively with the
    # occupancy query's grid (4 SMs x 3 here); every other kernel plainly.
    for (kernel, grid, _, _), (_, cooperative) in zip(calls, cooperative_calls):
        persistent = kernel in (moe_fused.KERNEL, moe_fused.BWD_KERNEL)
        assert cooperative == persistent, kernel
        if persistent:
            assert grid == (12,), (kernel, grid)


def test_only_the_persistent_kernels_wait_for_other_blocks():
    """The kernels whose source waits for other blocks (a grid barrier or a bounded wait) are
    exactly the ones the Python side launches cooperatively."""
    waiting = set()
    for f in sorted((ROOT / "cuda").rglob("*.cu")):
        src = re.sub(r"//[^\n]*", "", f.read_text())
        if re.search(r"\b(grid_barrier|block_wait_at_least|wait_at_least)\s*\(", src):
            waiting |= set(re.findall(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)', src))
    assert waiting == {moe_fused.KERNEL, moe_fused.BWD_KERNEL}
