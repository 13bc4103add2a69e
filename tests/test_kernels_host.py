"""The layer kernels' CUDA source (cuda/layers/*.cu) run on the CPU through the host runtime
(tests/cuda_host/): each op of horizon.kernels takes its CUDA branch with CPU tensors, and its
launch (the op's own grid, block, shared memory and argument list) runs the kernel on host
fibers. Outputs start NaN-filled; results are compared with the ops' torch references (and,
where it is the independent statement, plain torch / autograd) on odd sizes, unaligned views
and grid-stride loops that wrap."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "cuda_host"))
import hostbuild  # noqa: E402

import horizon.kernels as K  # noqa: E402
from horizon.kernels import activation, cross_entropy, norm, rope  # noqa: E402

LAYER_FILES = ["layers/cross_entropy.cu", "layers/grad_accumulate.cu", "layers/grad_reduce.cu", "layers/rmsnorm.cu",
               "layers/rope.cu", "layers/swiglu.cu"]


@pytest.fixture(scope="module")
def host_build(tmp_path_factory):
    return hostbuild.build_kernels(LAYER_FILES, tmp_path_factory.mktemp("host_layers"))


@pytest.fixture
def dev(host_build, monkeypatch):
    """Kernel outputs NaN-poisoned; every launch runs on the host build (2 SMs)."""
    from horizon.kernels import _common

    monkeypatch.setattr(_common, "POISON", True)
    host_build.patch(monkeypatch, sms=2)
    host_build.launches.clear()
    return host_build


fake = hostbuild.fake


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def launched(dev):
    return [name for name, *_ in dev.launches]


def _bf(*shape, seed, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()


def _unaligned(t):
    """The same values in a contiguous view one element past a 16-byte boundary."""
    base = torch.empty(t.numel() + 1, dtype=t.dtype)
    v = base[1:].view(t.shape)
    v.copy_(t)
    return v


# ---------------------------------------------------------------- rmsnorm


@pytest.mark.parametrize("shape", [(37, 64), (5, 37), (2, 3, 40), (41, 2400)])
def test_rmsnorm_forward_and_backward(dev, shape):
    """(41, 2400): 300 eight-wide columns per row, more than the block's 256 threads, so a
    thread owns two column groups of the value-major dW accumulator; 41 rows over a grid of
    4 blocks (2 SMs x the occupancy's 2): the row loop wraps."""
    H = shape[-1]
    x, w, dy = _bf(*shape, seed=H), _bf(H, seed=1) + 1, _bf(*shape, seed=2)
    xs, ws = fake(x).requires_grad_(), fake(w).requires_grad_()
    y = K.rms_norm(xs, ws, 1e-5)
    dx, dw = torch.autograd.grad(y, (xs, ws), fake(dy))
    assert launched(dev) == ["horizon_rmsnorm_fwd", "horizon_rmsnorm_bwd"]
    rows = x.numel() // H
    assert dev.launches[1][1] == (min(2 * 2, -(-rows // 4)),)  # SMs x occupancy, >= 4 rows a block
    want = norm.rms_norm_reference(x, w, 1e-5)
    assert not y.isnan().any()
    # bf16 output: the kernel's fp32 sum of squares runs in another order than torch's mean.
    assert rel(y, want) < 4e-3 and (y == want).float().mean() > 0.97
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-5)
    rdx, rdw = norm.rms_norm_backward_reference(dy, x, w, rstd)
    assert not dx.isnan().any() and not dw.isnan().any()
    assert rel(dx, rdx) < 4e-3 and rel(dw, rdw) < 4e-3
    # Independent of the reference's formulas: fp32 autograd through HF's RMSNorm.
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    yf = wf * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5))
    adx, adw = torch.autograd.grad(yf, (xf, wf), dy.float())
    assert rel(dx, adx) < 1e-2 and rel(dw, adw) < 1e-2


# ---------------------------------------------------------------- swiglu


@pytest.mark.parametrize("shape,unaligned,sms", [((3, 37), False, 2), ((4, 64), False, 2), ((7, 9), True, 2),
                                                  ((40005,), False, 1)])
def test_swiglu_forward_and_backward(dev, monkeypatch, shape, unaligned, sms):
    dev.patch(monkeypatch, sms=sms)  # 40005 elements on one SM: the grid-stride loop wraps
    a, b, dy = _bf(*shape, seed=3, scale=2), _bf(*shape, seed=4), _bf(*shape, seed=5)
    if unaligned:
        a, b, dy = _unaligned(a), _unaligned(b), _unaligned(dy)
    As, Bs = fake(a).requires_grad_(), fake(b).requires_grad_()
    y = K.swiglu(As, Bs)
    da, db = torch.autograd.grad(y, (As, Bs), fake(dy))
    assert launched(dev) == ["horizon_swiglu_fwd", "horizon_swiglu_bwd"]
    for got in (y, da, db):
        assert not got.isnan().any()
    assert rel(y, activation.swiglu_reference(a, b)) < 4e-3
    rda, rdb = activation.swiglu_backward_reference(dy, a, b)
    assert rel(da, rda) < 4e-3 and rel(db, rdb) < 4e-3
    af, bf = a.float().requires_grad_(), b.float().requires_grad_()
    ada, adb = torch.autograd.grad(F.silu(af) * bf, (af, bf), dy.float())
    assert rel(da, ada) < 1e-2 and rel(db, adb) < 1e-2


# ---------------------------------------------------------------- rope


@pytest.mark.parametrize("B,S,nq,nk,D,tables,sms", [(2, 7, 3, 1, 16, "hf", 2), (1, 5, 2, 2, 12, "hf-batch", 2),
                                                     (2, 9, 4, 2, 32, "random-batch", 2), (2, 6, 2, 1, 10, "random", 2),
                                                     (1, 3, 1, 1, 2, "random", 2), (2, 520, 4, 2, 16, "hf", 1)])
def test_rope_forward_and_backward(dev, monkeypatch, B, S, nq, nk, D, tables, sms):
    dev.patch(monkeypatch, sms=sms)  # 4160 rows on one SM: the grid-stride loop wraps
    # q, k as attention makes them: [B, S, n, D].transpose(1, 2) (strided rows).
    q = _bf(B, S, nq, D, seed=6).transpose(1, 2)
    k = _bf(B, S, nk, D, seed=7).transpose(1, 2)
    nb = B if tables.endswith("batch") else 1
    if tables.startswith("hf"):
        pos = torch.arange(S).repeat(B, 1) + torch.arange(B).unsqueeze(1) * 3 if nb > 1 else torch.arange(S)
        cos, sin = rope.rope_cos_sin(pos, D, 10000.0, dtype=torch.bfloat16)
    else:  # halves that differ: the backward's transpose must pair each sine with its half
        cos, sin = _bf(nb, S, D, seed=10), _bf(nb, S, D, seed=11)
    qs = q.as_subclass(hostbuild.FakeCuda).requires_grad_()
    ks = k.as_subclass(hostbuild.FakeCuda).requires_grad_()
    qo, ko = K.apply_rope(qs, ks, fake(cos), fake(sin))
    gq, gk = _bf(B, nq, S, D, seed=8), _bf(B, nk, S, D, seed=9)
    dq, dk = torch.autograd.grad((qo, ko), (qs, ks), (fake(gq), fake(gk)))
    assert launched(dev) == ["horizon_rope"] * 4
    cf, sf = cos.float(), sin.float()
    for got, want in ((qo, rope.rope_reference(q.float(), cf, sf)), (ko, rope.rope_reference(k.float(), cf, sf)),
                      (dq, rope.rope_backward_reference(gq.float(), cf, sf)),
                      (dk, rope.rope_backward_reference(gk.float(), cf, sf))):
        assert got.shape == want.shape and not got.isnan().any()
        # fp32 math, one bf16 rounding: within half a bf16 ulp of the fp32 value (plus slack).
        assert ((got.float() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()
    # The backward against fp32 autograd through the forward formula.
    qf, kf = q.float().requires_grad_(), k.float().requires_grad_()
    aq, ak = torch.autograd.grad((rope.rope_reference(qf, cf, sf), rope.rope_reference(kf, cf, sf)), (qf, kf),
                                 (gq.float(), gk.float()))
    assert rel(dq, aq) < 4e-3 and rel(dk, ak) < 4e-3
    if tables.startswith("hf"):  # and the forward against HF's apply_rotary_pos_emb
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        hq, hk = apply_rotary_pos_emb(q.float(), k.float(), cf, sf)
        assert rel(qo, hq) < 4e-3 and rel(ko, hk) < 4e-3


# ---------------------------------------------------------------- cross-entropy rows


@pytest.mark.parametrize("ignore", [-100, 7])
@pytest.mark.parametrize("dtype,V,reduction,chunk", [(torch.bfloat16, 37, "mean", 4), (torch.float32, 64, "sum", 5),
                                                     (torch.float32, 50, "mean", None)])
def test_fused_cross_entropy_rows(dev, dtype, V, reduction, chunk, ignore):
    """ignore = 7: an ignore_index inside the vocabulary (the kernel must compare with it, not
    take "negative" for "ignored")."""
    N, H = 11, 24
    g = torch.Generator().manual_seed(V)
    h = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[labels == ignore] = ignore + 1
    labels[3] = labels[8] = ignore
    hs, ws = fake(h).requires_grad_(), fake(w).requires_grad_()
    loss = K.fused_linear_cross_entropy(hs, ws, fake(labels), ignore_index=ignore, reduction=reduction,
                                        chunk_size=chunk)
    dh, dw = torch.autograd.grad(loss, (hs, ws))
    kernel = "horizon_ce_rows_bf16" if dtype == torch.bfloat16 else "horizon_ce_rows_f32"
    assert set(launched(dev)) == {kernel}
    assert len(dev.launches) == -(-N // (chunk or N))
    assert all(grid == (min(chunk or N, N - i * (chunk or N)),) for i, (_, grid, _, _) in enumerate(dev.launches))
    hf, wf = h.float().requires_grad_(), w.float().requires_grad_()
    want = F.cross_entropy(hf @ wf.t(), labels, ignore_index=ignore, reduction=reduction)
    wdh, wdw = torch.autograd.grad(want, (hf, wf))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert abs(loss.item() - want.item()) <= tol * abs(want.item())
    assert rel(dh, wdh) < tol and rel(dw, wdw) < tol


@pytest.mark.parametrize("ignore", [-100, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ce_rows_kernel_against_reference_with_ignored_and_bad_labels(dev, dtype, ignore):
    """The row step alone, as _rows launches it: loss, in-place gradient; an out-of-range label
    gives a NaN loss and a zero gradient row. With ignore_index = 7 a label 7 is ignored and a
    label -100 is out of range like any other negative label."""
    C, V = 6, 45
    logits = (torch.randn(C, V, generator=torch.Generator().manual_seed(11)) * 3).to(dtype)
    labels = torch.tensor([0, 44, ignore, 3, 45, 20 if ignore == -100 else -100])
    scale = torch.tensor(0.25)
    loss, grad = cross_entropy._rows(fake(logits.clone()), fake(labels), ignore, fake(scale))
    assert launched(dev) == ["horizon_ce_rows_bf16" if dtype == torch.bfloat16 else "horizon_ce_rows_f32"]
    ok = torch.tensor([True, True, True, True, False, ignore == -100])
    rl, rg = cross_entropy._rows_reference(logits[ok], labels[ok], ignore, scale)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel(loss[ok], rl) < 1e-5  # fp32 math on the same input values
    assert rel(grad[ok].float(), rg) < tol
    assert loss[2] == 0 and (grad[2] == 0).all()  # the ignored row
    bad = [4] if ignore == -100 else [4, 5]
    for r in bad:
        assert loss[r].isnan() and (grad[r] == 0).all()


# ---------------------------------------------------------------- gradient checks and accumulation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,unaligned", [(1003, False), (1003, True), (70001, False)])
def test_sq_norm_and_nonfinite(dev, dtype, n, unaligned):
    t = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.1).to(dtype)
    if unaligned:
        t = _unaligned(t)
    got = K.grad_sq_norm(fake(t))
    assert set(launched(dev)) == {f"horizon_sq_norm_partial_{'bf16' if dtype == torch.bfloat16 else 'f32'}"}
    assert abs(got.item() - t.double().pow(2).sum().item()) <= 1e-5 * t.double().pow(2).sum().item()
    assert K.all_finite(fake(t))
    for where in (0, n // 2, n - 1):  # vector body and scalar tail
        bad = t.clone() if not unaligned else _unaligned(t)
        bad[where] = float("inf") if where else float("nan")
        assert not K.all_finite(fake(bad)), where


@pytest.mark.parametrize("n,unaligned", [(17, False), (1003, True), (70001, False)])
def test_accumulate_bf16_into_f32(dev, n, unaligned):
    g = torch.Generator().manual_seed(n)
    acc = torch.randn(n, generator=g)
    grad = torch.randn(n, generator=g).bfloat16()
    if unaligned:
        acc, grad = _unaligned(acc), _unaligned(grad)
    want = acc.clone() + 0.5 * grad.float()
    out = K.accumulate_grad_(fake(acc), fake(grad), 0.5)
    assert launched(dev) == ["horizon_acc_bf16_to_f32"]
    assert out.data_ptr() == acc.data_ptr()
    assert torch.allclose(acc, want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- the host runtime itself


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    return hostbuild.build_kernels([hostbuild.HERE / "runtime_selftest.cu"], tmp_path_factory.mktemp("host_selftest"))


def test_host_runtime_reports_a_missing_barrier_participant_and_a_stuck_spin(selftest):
    out = torch.zeros(64, dtype=torch.int32)
    assert selftest.run("selftest_missing_barrier", (2,), (64,), [("ptr", out.data_ptr())]) == 2
    flag = torch.zeros(1, dtype=torch.int32)
    assert selftest.run("selftest_spin", (2,), (32,), [("ptr", flag.data_ptr())], limit_s=0.5) == 1
    flag[0] = 1
    assert selftest.run("selftest_spin", (2,), (32,), [("ptr", flag.data_ptr())], limit_s=30) == 0
    with pytest.raises(AssertionError, match="kinds"):
        selftest.run("selftest_spin", (1,), (32,), [("i64", flag.data_ptr())])


def test_host_runtime_warp_collectives_match_their_definitions(selftest):
    G, B = 2, 96
    v = torch.randint(0, 9, (G * B,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    out = torch.full((G * B * 4,), -5, dtype=torch.int32)
    assert selftest.run("selftest_collectives", (G,), (B,), [("ptr", out.data_ptr()), ("ptr", v.data_ptr())]) == 0
    out = out.view(G * B, 4)
    for g in range(G * B):
        w0 = g // 32 * 32
        lanes = v[w0 : w0 + 32]
        assert out[g, 0] == v[w0 + ((g - w0) ^ 5)]
        assert out[g, 1] == sum(1 << i for i in range(32) if lanes[i] == v[g]) - (2**32 if lanes[31] == v[g] else 0)
        assert out[g, 2] == int(bool((lanes == 7).any()))
        assert out[g, 3] == int(v[g // B * B : g // B * B + B].sum())
