"""flash_moe: the torch reference against transformers' MoE blocks and a naive per-token
loop (CPU), and the CUDA kernels against the reference (gpu)."""


import pytest
import torch
import torch.nn.functional as F

from horizon import HorizonError
from horizon import moe
from horizon.moe import flash_moe


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Kernel outputs start NaN-filled, so an element a kernel does not write shows up."""
    from horizon.kernels import _common

    monkeypatch.setattr(_common, "POISON", True)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _weights(T, H, I, E, dtype=torch.float32, device="cpu", seed=0, two=False, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * scale).to(dtype).to(device)  # noqa: E731
    x = (torch.randn(T, H, generator=g)).to(dtype).to(device)
    return x, mk(E, H), mk(E, I, H), None if two else mk(E, I, H), mk(E, H, I)


def naive_moe(x, wr, w1, w3, w2, top_k, renormalize=True, capacity=None, activation="swiglu"):
    """Per-token, per-choice loop: the slowest, most obvious statement of the semantics."""
    T, H = x.shape
    E = wr.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    probs = torch.softmax((x @ wr.t()).to(acc), -1)
    used = [0] * E
    rows = []
    for t in range(T):
        p = probs[t]
        # Ties to the lowest index: python's sort is stable.
        chosen = sorted(range(E), key=lambda e: -p[e].item())[:top_k]
        ws = [p[e] for e in chosen]
        tot = sum(ws)
        out = torch.zeros(H, dtype=acc)
        for j, e in enumerate(chosen):
            w = ws[j] / tot if renormalize else ws[j]
            slot = used[e]
            used[e] += 1
            if capacity is not None and slot >= capacity:
                continue
            a = x[t] @ w1[e].t()
            h = {"swiglu": F.silu, "gelu": F.gelu, "relu": F.relu}[activation](a)
            if activation == "swiglu":
                h = h * (x[t] @ w3[e].t())
            out = out + w * (h @ w2[e].t()).to(acc)
        rows.append(out)
    return torch.stack(rows).to(x.dtype)


# ---------------------------------------------------------------- CPU: reference vs transformers


def _mixtral_block(H, I, E, k):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k,
                        router_jitter_noise=0.0)
    return MixtralSparseMoeBlock(cfg).eval()


def _qwen3_block(H, I, E, k, norm_topk):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k,
                         norm_topk_prob=norm_topk)
    return Qwen3MoeSparseMoeBlock(cfg).eval()


def _load(block, wr, w1, w3, w2):
    with torch.no_grad():
        block.gate.weight.copy_(wr)
        block.experts.gate_up_proj.copy_(torch.cat([w1, w3], dim=1))  # chunk(2, dim=-1): gate first
        block.experts.down_proj.copy_(w2)


@pytest.mark.parametrize("T,H,I,E,k", [(13, 32, 24, 8, 2), (9, 16, 40, 5, 1)])
def test_reference_matches_transformers_mixtral(T, H, I, E, k):
    x, wr, w1, w3, w2 = _weights(T, H, I, E, seed=T)
    block = _mixtral_block(H, I, E, k)
    _load(block, wr, w1, w3, w2)
    with torch.no_grad():
        want = block(x.unsqueeze(0)).squeeze(0)
        y, aux = flash_moe(x, wr, w1, w3, w2, top_k=k, renormalize=True)
    assert rel(y, want) < 1e-5
    assert aux.item() == 0.0


@pytest.mark.parametrize("norm_topk", [True, False])
def test_reference_matches_transformers_qwen3_moe(norm_topk):
    T, H, I, E, k = 17, 32, 12, 16, 8
    x, wr, w1, w3, w2 = _weights(T, H, I, E, seed=3)
    block = _qwen3_block(H, I, E, k, norm_topk)
    _load(block, wr, w1, w3, w2)
    with torch.no_grad():
        want = block(x.unsqueeze(0)).squeeze(0)
        y, _ = flash_moe(x, wr, w1, w3, w2, top_k=k, renormalize=norm_topk)
    assert rel(y, want) < 1e-5


def test_aux_loss_matches_transformers_load_balancing_and_z_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    T, H, I, E, k = 23, 16, 8, 6, 2
    x, wr, w1, w3, w2 = _weights(T, H, I, E, seed=4, scale=1.0)
    _, aux = flash_moe(x, wr, w1, w3, w2, top_k=k, aux_loss_coef=0.01)
    want = 0.01 * load_balancing_loss_func((x @ wr.t(),), E, k)
    assert abs(aux.item() - want.item()) <= 1e-5 * want.item()
    _, z = flash_moe(x, wr, w1, w3, w2, top_k=k, z_loss_coef=0.001)
    want_z = 0.001 * torch.logsumexp(x.double() @ wr.double().t(), -1).pow(2).mean()
    assert abs(z.item() - want_z.item()) <= 1e-5 * want_z.item()


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("capacity_factor", [None, 0.7])
def test_reference_matches_naive_loop_and_gradients(activation, capacity_factor):
    T, H, I, E, k = 11, 12, 10, 4, 2
    x, wr, w1, w3, w2 = _weights(T, H, I, E, dtype=torch.float64, seed=5, two=activation != "swiglu", scale=0.5)
    ins = [t.requires_grad_() for t in (x, wr, w1, w3, w2) if t is not None]
    cap = moe.capacity_of(capacity_factor, T, k, E)
    y, aux = flash_moe(x, wr, w1, w3, w2, top_k=k, capacity_factor=capacity_factor, activation=activation,
                       aux_loss_coef=0.1, z_loss_coef=0.01)
    want = naive_moe(x, wr, w1, w3, w2, k, True, cap, activation)
    assert rel(y, want) < 1e-12
    if cap is not None:
        assert moe.place(moe.route(x, wr, k, True)[3], E, cap)[1].sum() < T * k  # something was dropped
    gy = torch.randn_like(y)
    got = torch.autograd.grad((y * gy).sum() + 3.0 * aux, ins)
    probs = torch.softmax(x @ wr.t(), -1)
    top = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    f = torch.bincount(top.reshape(-1), minlength=E).double() / T
    want_aux = 0.1 * E * (f * probs.mean(0)).sum() + 0.01 * torch.logsumexp(x @ wr.t(), -1).pow(2).mean()
    assert abs(aux.item() - want_aux.item()) < 1e-12
    ref = torch.autograd.grad((want * gy).sum() + 3.0 * want_aux, ins)
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-10


def test_placement_is_token_order_and_capacity_drops_late_tokens():
    experts = torch.tensor([[0, 1], [1, 0], [0, 2], [0, 1]])
    slot, keep, counts = moe.place(experts, 3, 2)
    assert slot.tolist() == [0, 0, 1, 1, 2, 0, 3, 2]
    assert keep.tolist() == [True, True, True, True, False, True, False, False]
    assert counts.tolist() == [4, 3, 1]


def test_skewed_routing_and_empty_experts():
    T, H, I, E, k = 15, 8, 6, 6, 2
    x, wr, w1, w3, w2 = _weights(T, H, I, E, dtype=torch.float64, seed=6)
    wr[0] = x.mean(0) * 40  # expert 0 wins almost everywhere
    wr[5] = -x.mean(0) * 40  # expert 5 never
    y, _ = flash_moe(x, wr, w1, w3, w2, top_k=k)
    assert rel(y, naive_moe(x, wr, w1, w3, w2, k)) < 1e-12


def test_flash_moe_validates():
    x, wr, w1, w3, w2 = _weights(4, 8, 6, 3)
    with pytest.raises(HorizonError, match="top_k"):
        flash_moe(x, wr, w1, w3, w2, top_k=4)
    with pytest.raises(HorizonError, match="w2"):
        flash_moe(x, wr, w1, w3, w2.transpose(1, 2), top_k=1)
    with pytest.raises(HorizonError, match="w3 must be None"):
        flash_moe(x, wr, w1, w3, w2, top_k=1, activation="gelu")
    with pytest.raises(HorizonError, match="activation"):
        flash_moe(x, wr, w1, w3, w2, top_k=1, activation="tanh")
    with pytest.raises(HorizonError, match="capacity_factor"):
        flash_moe(x, wr, w1, w3, w2, top_k=1, capacity_factor=0)
    with pytest.raises(HorizonError, match="dtype"):
        flash_moe(x.double(), wr, w1, w3, w2, top_k=1)


# ---------------------------------------------------------------- the fused path's torch twin (CPU)

from horizon.kernels import moe_fused  # noqa: E402


@pytest.mark.parametrize("T,E,k,cf,renorm", [(37, 8, 2, None, True), (29, 16, 8, None, False), (41, 5, 1, 0.6, True),
                                              (33, 6, 2, 0.8, True)])
def test_fused_torch_path_matches_reference_and_autograd(T, E, k, cf, renorm):
    H, I = 16, 24
    x, wr, w1, w3, w2 = _weights(T, H, I, E, seed=T + E, scale=0.4)
    wr[1] += x.mean(0) * 3  # skew: expert 1 is popular
    ins = [t.clone().requires_grad_() for t in (x, wr, w1, w3, w2)]
    kw = dict(top_k=k, renormalize=renorm, capacity_factor=cf, aux_loss_coef=0.05, z_loss_coef=0.01)
    y, aux = moe_fused.flash_moe_fused(*ins, use_kernel=False, **kw)
    ref_ins = [t.clone().requires_grad_() for t in (x, wr, w1, w3, w2)]
    yr, auxr = moe.flash_moe_reference(*ref_ins, **kw)
    assert rel(y, yr) < 1e-5
    assert abs(aux.item() - auxr.item()) <= 1e-5 * abs(auxr.item())
    gy = torch.randn_like(y)
    got = torch.autograd.grad((y * gy).sum() + 2.0 * aux, ins)
    want = torch.autograd.grad((yr * gy).sum() + 2.0 * auxr, ref_ins)
    for name, a, b in zip(("dx", "dwr", "dw1", "dw3", "dw2"), got, want):
        assert rel(a, b) < 1e-5, name


def test_fused_torch_state_is_consistent():
    T, H, I, E, k = 21, 8, 16, 4, 2
    x, wr, w1, w3, w2 = _weights(T, H, I, E, seed=11)
    st = moe_fused.forward_torch(x, wr, w1, w3, w2, k, True, 7)
    keep = st.slot >= 0
    assert int(st.off[-1]) == int(keep.sum())
    # Kept pairs of each expert sit in token order at off[e] + slot.
    for e in range(E):
        seg = st.sorted[st.off[e] : st.off[e + 1]].long()
        assert torch.all(st.tope[seg] == e) and torch.all(seg[1:] > seg[:-1])
        assert st.slot[seg].tolist() == list(range(len(seg)))
    assert int(keep.sum()) < T * k  # capacity 7 dropped some


# ---------------------------------------------------------------- GPU: the kernel


def _exact_router_inputs(T, H, I, E, seed, skew=False):
    """bf16 inputs whose fp32 router logits are exact in any summation order (multiples of
    1/128, small), so the kernel and torch make the same top-k choices, ties included."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-8, 9, (T, H), generator=g).float() / 8
    wr = torch.randint(-4, 5, (E, H), generator=g).float() / 16
    if skew:
        wr[0] = x.mean(0).sign() / 2  # most tokens pick expert 0
        wr[E - 1] = -wr[0]  # expert E-1 gets nothing
    w1 = torch.randn(E, I, H, generator=g) * H**-0.5
    w3 = torch.randn(E, I, H, generator=g) * H**-0.5
    w2 = torch.randn(E, H, I, generator=g) * I**-0.5
    return [t.bfloat16().cuda() for t in (x, wr, w1, w3, w2)]


GPU_CASES = [
    # T, H, I, E, k, capacity_factor, skew
    (333, 136, 88, 8, 2, None, False),
    (129, 64, 200, 16, 1, None, True),
    (517, 128, 64, 128, 8, None, False),
    (257, 96, 120, 32, 2, 1.0, True),
    (1, 64, 64, 8, 2, None, False),
    (64, 256, 512, 64, 8, 0.5, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("T,H,I,E,k,cf,skew", GPU_CASES)
def test_gpu_kernel_state_matches_torch_twin(T, H, I, E, k, cf, skew):
    x, wr, w1, w3, w2 = _exact_router_inputs(T, H, I, E, seed=T + E, skew=skew)
    assert moe_fused.can_run(x, wr, w1, w3, w2, top_k=k, activation="swiglu")
    cap = moe.capacity_of(cf, T, k, E)
    got = moe_fused.forward_kernel(x, wr, w1, w3, w2, k, True, cap)
    want = moe_fused.forward_torch(x, wr, w1, w3, w2, k, True, cap)
    torch.cuda.synchronize()
    assert torch.equal(got.logits, want.logits)  # exact by construction
    assert torch.equal(got.tope, want.tope)
    assert torch.equal(got.slot, want.slot)
    assert torch.equal(got.off, want.off)
    n = int(want.off[-1])
    assert torch.equal(got.sorted[:n], want.sorted[:n])
    assert rel(got.topw, want.topw) < 1e-4
    assert rel(got.h[:n], want.h[:n]) < 2e-2
    keep = want.slot >= 0
    assert not got.outp[keep].isnan().any()
    assert rel(got.outp[keep], want.outp[keep]) < 2e-2
    assert not got.y.isnan().any()
    assert rel(got.y, want.y) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("T,H,I,E,k,cf,skew", GPU_CASES[:4])
def test_gpu_flash_moe_gradients(T, H, I, E, k, cf, skew):
    ins = _exact_router_inputs(T, H, I, E, seed=7 * T + E, skew=skew)
    kw = dict(top_k=k, capacity_factor=cf, aux_loss_coef=0.01, z_loss_coef=0.001)
    xs = [t.clone().requires_grad_() for t in ins]
    y, aux = flash_moe(*xs, **kw)  # the kernel path
    # Oracle: the torch twin in fp32 (its backward is checked against autograd on the CPU).
    fs = [t.float().requires_grad_() for t in ins]
    yr, auxr = moe_fused.flash_moe_fused(*fs, use_kernel=False, **kw)
    assert rel(y, yr) < 2e-2 and abs(aux.item() - auxr.item()) <= 1e-3 * abs(auxr.item())
    gy = torch.randn_like(yr)
    got = torch.autograd.grad((y.float() * gy).sum() + aux, xs)
    want = torch.autograd.grad((yr * gy).sum() + auxr, fs)
    for name, a, b in zip(("dx", "dwr", "dw1", "dw3", "dw2"), got, want):
        assert not a.isnan().any(), name
        assert rel(a, b) < 3e-2, name


@pytest.mark.gpu
def test_gpu_flash_moe_matches_reference_on_random_weights():
    torch.manual_seed(0)
    T, H, I, E, k = 300, 128, 96, 8, 2
    x, wr, w1, w3, w2 = _weights(T, H, I, E, dtype=torch.bfloat16, device="cuda", seed=1, scale=0.1)
    y, _ = flash_moe(x, wr, w1, w3, w2, top_k=k)
    yr, _ = moe_fused.flash_moe_fused(*(t.float() for t in (x, wr, w1, w3, w2)), top_k=k, use_kernel=False)
    assert rel(y, yr) < 2e-2
