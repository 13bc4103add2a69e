"""Fused layer ops (horizon.kernels): the torch reference path on the CPU against plain
autograd / HF / torch.nn.functional, and the CUDA kernels against the reference (gpu)."""


import pytest
import torch
import torch.nn.functional as F

import horizon.kernels as K
from horizon import HorizonError
from horizon.kernels import cross_entropy, norm, rope


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Kernel outputs start NaN-filled, so an element a kernel does not write shows up."""
    from horizon.kernels import _common

    monkeypatch.setattr(_common, "POISON", True)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _hf_rmsnorm(x, w, eps):
    # HF LlamaRMSNorm, with fp64 statistics for fp64 inputs so formulas check to fp64 precision.
    h = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


# ---------------------------------------------------------------- CPU (reference path)


@pytest.mark.parametrize("shape", [(5, 37), (2, 3, 64)])
def test_rms_norm_matches_autograd(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[-1], dtype=torch.float64, requires_grad=True)
    y = K.rms_norm(x, w, 1e-6)
    ref = _hf_rmsnorm(x, w, 1e-6)
    assert rel(y, ref) < 1e-12
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    rdx, rdw = torch.autograd.grad(ref, (x, w), g)
    assert rel(dx, rdx) < 1e-10 and rel(dw, rdw) < 1e-10


def test_rms_norm_bf16_output_dtype_and_values():
    torch.manual_seed(1)
    x = torch.randn(4, 48).bfloat16()
    w = torch.randn(48).bfloat16()
    y = K.rms_norm(x, w, 1e-5)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, _hf_rmsnorm(x, w, 1e-5))


def test_rms_norm_validates():
    with pytest.raises(HorizonError, match="weight"):
        K.rms_norm(torch.randn(3, 4), torch.randn(5), 1e-6)
    with pytest.raises(HorizonError, match="eps"):
        K.rms_norm(torch.randn(3, 4), torch.randn(4), -1.0)


def _hf_rope(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def test_rope_cos_sin_matches_hf():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=10000.0, max_position_embeddings=64)
    emb = LlamaRotaryEmbedding(cfg)
    pos = torch.arange(11).unsqueeze(0) + 3
    cos_ref, sin_ref = emb(torch.zeros(1, 11, 64), pos)
    theta = cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta
    cos, sin = K.rope_cos_sin(torch.arange(11) + 3, 16, theta, torch.float32, "cpu")
    assert cos.shape == (1, 11, 16)
    assert torch.allclose(cos, cos_ref, atol=1e-6) and torch.allclose(sin, sin_ref, atol=1e-6)


@pytest.mark.parametrize("cos_batch", [1, 2])
def test_apply_rope_matches_hf_and_autograd(cos_batch):
    torch.manual_seed(2)
    B, nq, nk, S, D = 2, 3, 1, 5, 12
    q = torch.randn(B, S, nq, D, dtype=torch.float64).transpose(1, 2).requires_grad_()  # strided, as in attention
    k = torch.randn(B, nk, S, D, dtype=torch.float64, requires_grad=True)
    pos = torch.stack([torch.arange(S) + 7 * b for b in range(cos_batch)])
    cos, sin = K.rope_cos_sin(pos, D, 500.0, torch.float64, "cpu")
    oq, ok = K.apply_rope(q, k, cos, sin)
    rq, rk = _hf_rope(q, k, cos, sin)
    assert rel(oq, rq) < 1e-12 and rel(ok, rk) < 1e-12
    gq, gk = torch.randn_like(oq), torch.randn_like(ok)
    d = torch.autograd.grad((oq, ok), (q, k), (gq, gk))
    r = torch.autograd.grad((rq, rk), (q, k), (gq, gk))
    assert rel(d[0], r[0]) < 1e-12 and rel(d[1], r[1]) < 1e-12


def test_rope_backward_is_transpose_for_arbitrary_tables():
    # The backward formula must be the exact transpose even when cos/sin halves differ.
    torch.manual_seed(3)
    x = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    g = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    cos, sin = torch.randn(1, 3, 8, dtype=torch.float64), torch.randn(1, 3, 8, dtype=torch.float64)
    lhs = (rope.rope_reference(x, cos, sin) * g).sum()
    rhs = (x * rope.rope_backward_reference(g, cos, sin)).sum()
    assert abs(lhs.item() - rhs.item()) < 1e-10 * max(1.0, abs(lhs.item()))


def test_apply_rope_validates():
    q = torch.randn(1, 2, 3, 8)
    cos, sin = K.rope_cos_sin(torch.arange(3), 8, 1e4, torch.float32, "cpu")
    with pytest.raises(HorizonError, match="cos"):
        K.apply_rope(q, q, cos[:, :2], sin[:, :2])
    with pytest.raises(HorizonError, match="head_dim"):
        K.rope_cos_sin(torch.arange(3), 7, 1e4, torch.float32, "cpu")


def test_swiglu_matches_autograd():
    torch.manual_seed(4)
    a = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
    y = K.swiglu(a, b)
    ref = F.silu(a) * b
    assert rel(y, ref) < 1e-14
    g = torch.randn_like(y)
    d = torch.autograd.grad(y, (a, b), g)
    r = torch.autograd.grad(ref, (a, b), g)
    assert rel(d[0], r[0]) < 1e-12 and rel(d[1], r[1]) < 1e-12
    with pytest.raises(HorizonError, match="shapes"):
        K.swiglu(a, b[:, :3])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_fused_linear_cross_entropy_matches_torch(reduction, chunk):
    torch.manual_seed(5)
    N, H, V = 11, 16, 37
    h = torch.randn(N, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    labels[[1, 6]] = -100
    loss = K.fused_linear_cross_entropy(h, w, labels, chunk_size=chunk, reduction=reduction)
    ref = F.cross_entropy(h @ w.t(), labels, ignore_index=-100, reduction=reduction)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    # A non-unit upstream gradient checks that backward scales by it.
    d = torch.autograd.grad(loss * 3.0, (h, w))
    r = torch.autograd.grad(ref * 3.0, (h, w))
    assert rel(d[0], r[0]) < 1e-5 and rel(d[1], r[1]) < 1e-5


def test_fused_linear_cross_entropy_only_weight_grad_and_custom_ignore():
    torch.manual_seed(6)
    h = torch.randn(9, 8)
    w = torch.randn(21, 8, dtype=torch.float32, requires_grad=True)
    labels = torch.randint(0, 21, (9,))
    labels[0] = 5  # ignore_index = 5 makes every label-5 token ignored
    loss = K.fused_linear_cross_entropy(h, w, labels, ignore_index=5, chunk_size=2)
    ref = F.cross_entropy(h @ w.t(), labels, ignore_index=5)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    (dw,) = torch.autograd.grad(loss, (w,))
    (rw,) = torch.autograd.grad(ref, (w,))
    assert rel(dw, rw) < 1e-5


def test_ce_rows_reference_gradient_is_softmax_minus_onehot():
    torch.manual_seed(7)
    logits = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 8, -100, 3, 3])
    loss, grad = cross_entropy._rows_reference(logits.detach(), labels, -100, torch.tensor(0.5))
    ref = F.cross_entropy(logits, labels, reduction="none")
    (g,) = torch.autograd.grad(ref.sum() * 0.5, (logits,))
    assert rel(loss, ref) < 1e-12 and rel(grad, g) < 1e-12


def test_fused_linear_cross_entropy_validates():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(HorizonError, match="out of range"):
        K.fused_linear_cross_entropy(h, w, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(HorizonError, match="reduction"):
        K.fused_linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 3]), reduction="none")
    with pytest.raises(HorizonError, match="chunk_size"):
        K.fused_linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 3]), chunk_size=0)
    with pytest.raises(HorizonError, match="labels"):
        K.fused_linear_cross_entropy(h, w, torch.tensor([0, 1, 2]))


def test_grad_sq_norm_and_all_finite_cpu():
    torch.manual_seed(8)
    a, b = torch.randn(13), torch.randn(3, 5).bfloat16()
    got = K.grad_sq_norm([a, b])
    want = a.double().pow(2).sum() + b.double().pow(2).sum()
    assert abs(got.item() - want.item()) <= 1e-6 * want.item()
    assert K.all_finite([a, b])
    b[1, 2] = float("inf")
    assert not K.all_finite([a, b])
    a[0] = float("nan")
    assert not K.all_finite(a)
    with pytest.raises(HorizonError):
        K.grad_sq_norm(torch.arange(3))


def test_accumulate_grad_still_works():
    acc = torch.zeros(10)
    g = torch.randn(10).bfloat16()
    K.accumulate_grad_(acc, g, 2.0)
    assert torch.allclose(acc, 2.0 * g.float())


# ---------------------------------------------------------------- GPU (kernels vs reference)

cuda = pytest.mark.gpu


def _poison(t):
    return t.fill_(float("nan"))


def _counter():
    """Launches of our kernels from here on, as the driver wrapper counted them: each GPU test
    asserts its kernel ran (an op that fell back to torch would compare the reference with
    itself)."""
    from horizon import native

    return native.LaunchCounter()


@cuda
@pytest.mark.parametrize("rows,H", [(1, 8), (37, 1000), (129, 4096), (5, 77), (3, 13000)])
def test_gpu_rms_norm(rows, H):
    from horizon import native

    assert native.can_launch(torch.empty(1, device="cuda"), "horizon_rmsnorm_fwd")
    torch.manual_seed(rows + H)
    x = (torch.randn(rows, H, device="cuda") * 3).bfloat16().requires_grad_()
    w = torch.randn(H, device="cuda").bfloat16().requires_grad_()
    ran = _counter()
    y = K.rms_norm(x, w, 1e-6)
    ref = _hf_rmsnorm(x.detach().double(), w.detach().double(), 1e-6)
    assert not y.isnan().any()
    assert rel(y, ref) < 1e-2
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rdx, rdw = torch.autograd.grad(_hf_rmsnorm(xd, wd, 1e-6), (xd, wd), g.double())
    assert not dx.isnan().any() and not dw.isnan().any()
    assert rel(dx, rdx) < 2e-2 and rel(dw, rdw) < 2e-2
    # The backward kernel keeps a row of dW partials in shared memory: up to norm._MAX_SMEM_H.
    assert ran.since() == {"horizon_rmsnorm_fwd": 1, **({"horizon_rmsnorm_bwd": 1} if H <= norm._MAX_SMEM_H else {})}


@cuda
def test_gpu_rms_norm_writes_every_element():
    x = torch.randn(33, 520, device="cuda").bfloat16()
    w = torch.randn(520, device="cuda").bfloat16()
    y = _poison(torch.empty_like(x))
    rstd = _poison(torch.empty(33, device="cuda"))
    from horizon import native

    ran = _counter()
    native.launch("horizon_rmsnorm_fwd", (7,), (256,), [("ptr", y.data_ptr()), ("ptr", rstd.data_ptr()),
                  ("ptr", x.data_ptr()), ("ptr", w.data_ptr()), ("i64", 33), ("i32", 520), ("f32", 1e-6)])
    assert ran.since() == {"horizon_rmsnorm_fwd": 1}
    assert not y.isnan().any() and not rstd.isnan().any()
    assert rel(y, norm.rms_norm_reference(x.double(), w.double(), 1e-6)) < 1e-2


@cuda
@pytest.mark.parametrize("D,strided,cos_batch", [(128, True, 1), (64, False, 2), (6, True, 2), (80, False, 1)])
def test_gpu_rope(D, strided, cos_batch):
    torch.manual_seed(D)
    B, nq, nk, S = 2, 5, 3, 37
    if strided:
        q = torch.randn(B, S, nq, D, device="cuda").bfloat16().transpose(1, 2)
    else:
        q = torch.randn(B, nq, S, D, device="cuda").bfloat16()
    k = torch.randn(B, nk, S, D, device="cuda").bfloat16()
    q.requires_grad_()
    k.requires_grad_()
    pos = torch.stack([torch.arange(S, device="cuda") + 11 * b for b in range(cos_batch)])
    cos, sin = K.rope_cos_sin(pos, D, 10000.0, torch.bfloat16, "cuda")
    ran = _counter()
    oq, ok = K.apply_rope(q, k, cos, sin)
    assert ran.since() == {"horizon_rope": 2}  # q and k
    rq = rope.rope_reference(q.detach().double(), cos.double(), sin.double())
    rk = rope.rope_reference(k.detach().double(), cos.double(), sin.double())
    assert not oq.isnan().any() and not ok.isnan().any()
    assert rel(oq, rq) < 1e-2 and rel(ok, rk) < 1e-2
    gq, gk = torch.randn_like(oq), torch.randn_like(ok)
    dq, dk = torch.autograd.grad((oq, ok), (q, k), (gq, gk))
    assert ran.since() == {"horizon_rope": 4}  # and their gradients
    assert rel(dq, rope.rope_backward_reference(gq.double(), cos.double(), sin.double())) < 1e-2
    assert rel(dk, rope.rope_backward_reference(gk.double(), cos.double(), sin.double())) < 1e-2


@cuda
@pytest.mark.parametrize("n", [1, 7, 8, 1001, 4096 * 3 + 5])
def test_gpu_swiglu(n):
    torch.manual_seed(n)
    a = (torch.randn(n, device="cuda") * 4).bfloat16().requires_grad_()
    b = torch.randn(n, device="cuda").bfloat16().requires_grad_()
    ran = _counter()
    y = K.swiglu(a, b)
    ad, bd = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = F.silu(ad) * bd
    assert not y.isnan().any() and rel(y, ref) < 1e-2
    g = torch.randn_like(y)
    da, db = torch.autograd.grad(y, (a, b), g)
    ra, rb = torch.autograd.grad(ref, (ad, bd), g.double())
    assert rel(da, ra) < 1e-2 and rel(db, rb) < 1e-2
    assert ran.since() == {"horizon_swiglu_fwd": 1, "horizon_swiglu_bwd": 1}


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("V,ignore", [(1, -100), (37, -100), (37, 5), (5003, -100), (5003, 0)])
def test_gpu_ce_rows_kernel(dtype, V, ignore):
    """ignore_index inside the vocabulary (5, 0): the kernel compares with it."""
    torch.manual_seed(V)
    C = 19
    logits = (torch.randn(C, V, device="cuda") * 3).to(dtype)
    labels = torch.randint(0, V, (C,), device="cuda")
    labels[labels == ignore] = ignore + 1
    labels[3] = labels[11] = ignore
    scale = torch.tensor(0.25, device="cuda")
    want_loss, want_grad = cross_entropy._rows_reference(logits.double(), labels, ignore, scale.double())
    ran = _counter()
    loss, grad = cross_entropy._rows(logits.clone(), labels, ignore, scale)
    assert ran.since() == {"horizon_ce_rows_bf16" if dtype == torch.bfloat16 else "horizon_ce_rows_f32": 1}
    assert loss[3] == 0 and (grad[3] == 0).all()
    assert not loss.isnan().any() and not grad.isnan().any()
    assert rel(loss, want_loss) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert rel(grad, want_grad) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@cuda
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gpu_fused_linear_cross_entropy(reduction):
    torch.manual_seed(9)
    N, H, V = 301, 96, 3001
    h = torch.randn(N, H, device="cuda", requires_grad=True)
    w = (torch.randn(V, H, device="cuda") * 0.1).requires_grad_()
    labels = torch.randint(0, V, (N,), device="cuda")
    labels[::7] = -100
    ran = _counter()
    loss = K.fused_linear_cross_entropy(h, w, labels, chunk_size=64, reduction=reduction)
    assert ran.since() == {"horizon_ce_rows_f32": -(-N // 64)}
    ref = F.cross_entropy(h.double() @ w.double().t(), labels, reduction=reduction)
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item())
    d = torch.autograd.grad(loss, (h, w))
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    r = torch.autograd.grad(F.cross_entropy(hd @ wd.t(), labels, reduction=reduction), (hd, wd))
    assert rel(d[0], r[0]) < 1e-3 and rel(d[1], r[1]) < 1e-3
    # bf16 end to end.
    ran = _counter()
    lb = K.fused_linear_cross_entropy(h.detach().bfloat16(), w.detach().bfloat16(), labels, reduction=reduction)
    assert ran.since() == {"horizon_ce_rows_bf16": 1}  # one chunk: N x V is under the chunk's logits
    assert abs(lb.item() - ref.item()) <= 2e-2 * abs(ref.item())


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 9, 100003])
def test_gpu_grad_sq_norm_and_finite(dtype, n):
    torch.manual_seed(n)
    t = torch.randn(n, device="cuda").to(dtype)
    ran = _counter()
    got = K.grad_sq_norm(t)
    suffix = "bf16" if dtype == torch.bfloat16 else "f32"
    assert ran.since() == {f"horizon_sq_norm_partial_{suffix}": 1}
    want = t.double().pow(2).sum()
    assert got.is_cuda and abs(got.item() - want.item()) <= 1e-4 * want.item()
    assert K.all_finite(t)
    t[n // 2] = float("nan")
    assert not K.all_finite(t)
    assert ran.since().get(f"horizon_nonfinite_{suffix}") == 2
    t[n // 2] = float("-inf")
    assert not K.all_finite([torch.ones(3, device="cuda"), t])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal this checks is the one without a GPU")
def test_the_launch_counter_counts_only_launches_the_driver_accepted():
    """Without a GPU every launch is refused, and a refused launch is not counted: the GPU
    tests' "our kernel ran" cannot be satisfied by an attempt."""
    from horizon import _native, native

    ran = native.LaunchCounter()
    for cooperative in (False, True):
        with pytest.raises(HorizonError):
            _native.launch("horizon_rope", (1,), (32,), 0, 0, 0, [], cooperative=cooperative)
    assert ran.since() == {} and "horizon_rope" not in native.launch_counts()


def test_every_kernel_the_ops_launch_is_embedded_without_spills():
    """The Python ops and the fatbin agree on kernel names, and ptxas reported no spills for
    them on sm_80 and sm_90a (runs without a GPU: it reads the build report)."""
    from horizon import native
    from horizon.kernels import grad
    from horizon.kernels.moe import fused as moe_fused

    if not native.has_kernels():
        pytest.skip("built without kernels (no nvcc)")
    names = {norm._FWD, norm._BWD, rope._ROPE, "horizon_swiglu_fwd", "horizon_swiglu_bwd", moe_fused.KERNEL,
             grad._ACC, *cross_entropy._ROWS.values(), *grad._SQ.values(), *grad._FIN.values()}
    report = native.system_info()["kernels"]
    for name in names:
        entries = [k for k in report if k["name"] == name]
        assert {k["arch"] for k in entries} >= {"sm_80", "sm_90a"}, name
        assert all(k["spill_store_bytes"] == 0 and k["spill_load_bytes"] == 0 for k in entries), name
