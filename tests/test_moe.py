"""flash_moe: the torch reference against transformers' MoE blocks and a naive per-token
loop (CPU), and the CUDA kernels against the reference (gpu)."""


import math

import pytest
import torch
import torch.nn.functional as F

from horizon import HorizonError
from horizon import native
from horizon.kernels.moe import reference as moe
from horizon.moe import flash_moe


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Kernel outputs start NaN-filled, so an element a kernel does not write shows up."""
    from horizon.kernels import _common

    monkeypatch.setattr(_common, "POISON", True)


def _capacity(capacity_factor, tokens, top_k, num_experts):
    """The oracle's own expert capacity, from the documented formula (docs: ceil(cf x T x k / E)),
    never the code under test's."""
    if capacity_factor is None:
        return None
    return int(math.ceil(capacity_factor * tokens * top_k / num_experts))


def test_capacity_is_the_documented_ceiling():
    from horizon.kernels.moe.reference import capacity_of

    # 1.25 x 10 x 2 / 3 = 8.33: the ceiling (9) keeps a token the floor (8) would drop.
    assert capacity_of(1.25, 10, 2, 3) == 9 == _capacity(1.25, 10, 2, 3)
    assert capacity_of(1.0, 8, 2, 4) == 4 and capacity_of(None, 8, 2, 4) is None


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
    cap = _capacity(capacity_factor, T, k, E)
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

from horizon.kernels.moe import fused as moe_fused  # noqa: E402


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
    cap = _capacity(cf, T, k, E)
    ran = native.LaunchCounter()
    got = moe_fused.forward_kernel(x, wr, w1, w3, w2, k, True, cap)
    assert ran.since().get(moe_fused.KERNEL) == 1  # our kernel ran: not the twin twice
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
def test_gpu_cooperative_launch_fits_an_oversized_grid(monkeypatch):
    """A grid four times what can be resident: the cooperative launch is refused as too large
    and retried halved until it fits (never started partly, so no wait hangs); each output
    element has one writer whatever the grid, so the results are the same bits."""
    x, wr, w1, w3, w2 = _exact_router_inputs(333, 136, 88, 8, seed=5, skew=False)
    dy = torch.randn(333, 136, device="cuda").bfloat16()
    st = moe_fused.forward_kernel(x, wr, w1, w3, w2, 2, True, None)
    want = (st.y, *moe_fused.backward_kernel(st, dy, None, x, wr, w1, w3, w2, 2, True))
    fits = moe_fused.blocks_per_sm(moe_fused.KERNEL, x), moe_fused.blocks_per_sm(moe_fused.BWD_KERNEL, x)
    monkeypatch.setattr(moe_fused, "blocks_per_sm", lambda kernel, t: 4 * fits[kernel == moe_fused.BWD_KERNEL])
    st2 = moe_fused.forward_kernel(x, wr, w1, w3, w2, 2, True, None)
    got = (st2.y, *moe_fused.backward_kernel(st2, dy, None, x, wr, w1, w3, w2, 2, True))
    torch.cuda.synchronize()
    moe_fused.check_status()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("T,H,I,E,k,cf,skew", GPU_CASES[:4])
def test_gpu_flash_moe_gradients(T, H, I, E, k, cf, skew):
    ins = _exact_router_inputs(T, H, I, E, seed=7 * T + E, skew=skew)
    kw = dict(top_k=k, capacity_factor=cf, aux_loss_coef=0.01, z_loss_coef=0.001)
    xs = [t.clone().requires_grad_() for t in ins]
    ran = native.LaunchCounter()
    y, aux = flash_moe(*xs, **kw)  # the kernel path
    assert ran.since().get(moe_fused.KERNEL) == 1
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
    ran = native.LaunchCounter()
    y, _ = flash_moe(x, wr, w1, w3, w2, top_k=k)
    assert ran.since().get(moe_fused.KERNEL) == 1
    yr, _ = moe_fused.flash_moe_fused(*(t.float() for t in (x, wr, w1, w3, w2)), top_k=k, use_kernel=False)
    assert rel(y, yr) < 2e-2


# ---------------------------------------------------------------- the backward kernel's torch transcription (CPU)


def _bwd_case(T, H, I, E, seed, dtype=torch.float32, exact=False):
    """Inputs with a skewed router (expert 1 popular) and an expert that no token picks
    (expert E-1: feature 0 is 3 in every token and only E-1 weighs it, at -10). exact: bf16-exact
    router logits in any summation order, so fp32 and bf16 routings agree."""
    g = torch.Generator().manual_seed(seed)
    if exact:
        x = torch.randint(-8, 9, (T, H), generator=g).float() / 8
        wr = torch.randint(-4, 5, (E, H), generator=g).float() / 16
    else:
        x = torch.randn(T, H, generator=g)
        wr = torch.randn(E, H, generator=g) * 0.4
    x[:, 0] = 3.0
    wr[:, 0] = 0.0
    wr[E - 1, 0] = -10.0
    wr[1, 1:] += x[:, 1:].mean(0).sign() / 4
    w1 = torch.randn(E, I, H, generator=g) * H**-0.5
    w3 = torch.randn(E, I, H, generator=g) * H**-0.5
    w2 = torch.randn(E, H, I, generator=g) * I**-0.5
    return [t.to(dtype) for t in (x, wr, w1, w3, w2)]


BWD_CASES = [
    # T, H, I, E, k, capacity_factor, renormalize, tile
    (37, 24, 40, 8, 2, None, True, 16),
    (29, 16, 24, 12, 8, None, False, 16),
    (41, 16, 24, 5, 1, 0.6, True, 64),
    (33, 24, 16, 6, 2, 0.8, True, 8),
    (70, 16, 72, 9, 2, 0.9, False, 64),
    (150, 16, 72, 5, 2, None, False, 64),
]


@pytest.mark.parametrize("T,H,I,E,k,cf,renorm,tile", BWD_CASES)
def test_backward_emulation_matches_autograd(T, H, I, E, k, cf, renorm, tile):
    """The kernel's decomposition (tile list, index arithmetic, masks, router backward), in fp32,
    against autograd through the reference; unwritten scratch is NaN, so a read of an element
    the kernel never writes, or an output element no tile writes, shows up."""
    ins = _bwd_case(T, H, I, E, seed=T + E)
    cap = _capacity(cf, T, k, E)
    st = moe_fused.forward_torch(*ins, k, renorm, cap)
    counts = (st.off[1:] - st.off[:-1]).tolist()
    assert counts[E - 1] == 0  # an expert with no tokens
    if cf is None:
        assert max(counts) > tile  # an expert with several row blocks
    else:
        assert int(st.off[-1]) < T * k  # capacity dropped pairs
    kw = dict(top_k=k, renormalize=renorm, capacity_factor=cf, aux_loss_coef=0.05, z_loss_coef=0.01)
    gy = torch.randn(T, H, generator=torch.Generator().manual_seed(1))
    xs = [t.clone().requires_grad_() for t in ins]
    y, logits, tope = moe_fused.FlashMoEFunction.apply(*xs, k, renorm, cap, False, "torch")
    aux = moe.aux_losses(logits, torch.softmax(logits, -1), tope, E, 0.05, 0.01)
    dlogits = torch.autograd.grad(2.0 * aux, logits, retain_graph=True)[0]
    got = moe_fused.backward_emulate(st, gy, dlogits, *ins, k, renorm, bm=tile, bn=tile)
    ref = [t.clone().requires_grad_() for t in ins]
    yr, auxr = moe.flash_moe_reference(*ref, **kw)
    want = torch.autograd.grad((yr * gy).sum() + 2.0 * auxr, ref)
    for name, a, b in zip(("dx", "dwr", "dw1", "dw3", "dw2"), got, want):
        assert not a.isnan().any(), name
        assert rel(a, b) < 1e-4, name  # fp32 summation orders differ


def test_backward_emulation_in_bf16_and_through_autograd():
    """bf16 rounding at the kernel's store points stays within bf16 tolerance of fp32 autograd;
    backward="emulate" is what autograd runs."""
    T, H, I, E, k = 45, 32, 48, 8, 2
    ins = _bwd_case(T, H, I, E, seed=3, dtype=torch.bfloat16, exact=True)
    xs = [t.clone().requires_grad_() for t in ins]
    kw = dict(top_k=k, capacity_factor=1.0, aux_loss_coef=0.01, z_loss_coef=0.001)
    y, aux = moe_fused.flash_moe_fused(*xs, use_kernel=False, backward="emulate", **kw)
    fs = [t.float().requires_grad_() for t in ins]
    yr, auxr = moe.flash_moe_reference(*fs, **kw)
    gy = torch.randn(T, H, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad((y.float() * gy).sum() + aux, xs)
    want = torch.autograd.grad((yr * gy).sum() + auxr, fs)
    for name, a, b in zip(("dx", "dwr", "dw1", "dw3", "dw2"), got, want):
        assert a.dtype == torch.bfloat16 and not a.isnan().any(), name
        assert rel(a, b) < 2e-2, name


def test_backward_choice_validates(monkeypatch):
    x, wr, w1, w3, w2 = _weights(4, 8, 8, 3)
    with pytest.raises(HorizonError, match="backward"):
        moe_fused.flash_moe_fused(x, wr, w1, w3, w2, top_k=1, backward="cuda")
    monkeypatch.setenv("HORIZON_MOE_BWD", "fast")
    with pytest.raises(HorizonError, match="HORIZON_MOE_BWD"):
        moe_fused.flash_moe_fused(x, wr, w1, w3, w2, top_k=1)


# ---------------------------------------------------------------- GPU: the backward kernel


def native_has(kernel):
    from horizon import native

    return native.has_kernels() and kernel in native.kernel_names()


GPU_BWD_CASES = [
    # T, H, I, E, k, capacity_factor, renormalize
    (333, 136, 88, 8, 2, None, True),
    (129, 64, 200, 16, 1, None, True),
    (517, 128, 64, 128, 8, None, False),
    (257, 96, 120, 32, 2, 1.0, True),
    (1, 64, 64, 8, 2, None, True),
    (200, 256, 512, 64, 8, 0.5, False),
    (1000, 64, 96, 9, 2, None, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("T,H,I,E,k,cf,renorm", GPU_BWD_CASES)
def test_gpu_backward_kernel_matches_autograd_through_reference(T, H, I, E, k, cf, renorm):
    """horizon_flash_moe_bwd (after the forward kernel) against fp32 autograd through the
    reference on the same bf16 values: skewed routing, an expert with no tokens (E-1), token
    counts off the 64-row tile, capacity drops; outputs and scratch NaN-poisoned (fixture)."""
    ins = [t.cuda() for t in _bwd_case(T, H, I, E, seed=T + E, dtype=torch.bfloat16, exact=True)]
    assert moe_fused.can_run(*ins, top_k=k, activation="swiglu")
    assert native_has(moe_fused.BWD_KERNEL)
    cap = _capacity(cf, T, k, E)
    st = moe_fused.forward_torch(*ins, k, renorm, cap)
    counts = (st.off[1:] - st.off[:-1]).tolist()
    if E > k:
        assert counts[E - 1] == 0
    kw = dict(top_k=k, renormalize=renorm, capacity_factor=cf, aux_loss_coef=0.01, z_loss_coef=0.001)
    gy = torch.randn(T, H, generator=torch.Generator().manual_seed(5)).cuda()
    xs = [t.clone().requires_grad_() for t in ins]
    ran = native.LaunchCounter()
    y, aux = moe_fused.flash_moe_fused(*xs, use_kernel=True, backward="kernel", **kw)
    got = torch.autograd.grad((y.float() * gy).sum() + aux, xs)
    assert ran.since().get(moe_fused.KERNEL) == 1 and ran.since().get(moe_fused.BWD_KERNEL) == 1
    fs = [t.float().requires_grad_() for t in ins]
    yr, auxr = moe.flash_moe_reference(*fs, **kw)
    want = torch.autograd.grad((yr * gy).sum() + auxr, fs)
    for name, a, b in zip(("dx", "dwr", "dw1", "dw3", "dw2"), got, want):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape, name
        assert not a.isnan().any(), name
        assert rel(a, b) < 2e-2, name
    # Deterministic: one writer per output element, fixed summation orders.
    xs2 = [t.clone().requires_grad_() for t in ins]
    y2, aux2 = moe_fused.flash_moe_fused(*xs2, use_kernel=True, backward="kernel", **kw)
    again = torch.autograd.grad((y2.float() * gy).sum() + aux2, xs2)
    for name, a, b in zip(("dx", "dwr", "dw1", "dw3", "dw2"), got, again):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_gpu_backward_kernel_matches_grouped_gemm_backward_on_one_state():
    """Both backwards from one forward state (so routing cannot differ), random weights; the
    grouped-GEMM backward (itself checked against autograd on the CPU) is the peer."""
    T, H, I, E, k = 300, 128, 96, 8, 2
    x, wr, w1, w3, w2 = _weights(T, H, I, E, dtype=torch.bfloat16, device="cuda", seed=1, scale=0.1)
    st = moe_fused.forward_kernel(x, wr, w1, w3, w2, k, True, None)
    dy = torch.randn(T, H, device="cuda").bfloat16()
    dlogits = torch.randn(T, E, device="cuda") * 1e-2
    ran = native.LaunchCounter()
    got = moe_fused.backward_kernel(st, dy, dlogits, x, wr, w1, w3, w2, k, True)
    assert ran.since() == {moe_fused.BWD_KERNEL: 1}
    want = moe_fused.backward_torch(st, dy, dlogits, x, wr, w1, w3, w2, k, True)
    for name, a, b in zip(("dx", "dwr", "dw1", "dw3", "dw2"), got, want):
        assert not a.isnan().any(), name
        assert rel(a, b) < 2e-2, name


# ---------------------------------------------------------------- the backward kernel's source on host threads (CPU)


@pytest.fixture(scope="module")
def host_bwd(tmp_path_factory):
    """cuda/moe/flash_moe_bwd.cu compiled with g++ against tests/cuda_host/ (blocks as OS
    threads, CUDA threads as fibers), its one asm statement (in moe_tiles.cuh) replaced by a
    host mma under HORIZON_HOST_MMA."""
    import ctypes
    import pathlib
    import shutil
    import subprocess

    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the host run of the backward kernel")
    root = pathlib.Path(__file__).resolve().parent.parent
    src = (root / "cuda" / "moe" / "flash_moe_bwd.cu").read_text()
    build = tmp_path_factory.mktemp("host_bwd")
    (build / "flash_moe_bwd_host_src.cu").write_text(src)
    lib = build / "libflash_moe_bwd_host.so"
    here = root / "tests" / "cuda_host"
    # HORIZON_HOST_MMA: moe_tiles.cuh calls the harness's host_mma16816 instead of the asm.
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-fno-strict-aliasing", "-DHORIZON_HOST_MMA",
           "-I", str(build), "-I",
           str(here / "shim"), "-I", str(root / "cuda"), "-o", str(lib), str(here / "flash_moe_bwd_host.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return ctypes.CDLL(str(lib))


@pytest.mark.parametrize("T,H,I,E,k,cf,renorm,blocks", [
    (130, 40, 72, 4, 2, None, True, 3),  # an expert over several row blocks; a 3-block grid
    (30, 24, 16, 12, 8, 0.5, False, 2),
    (41, 16, 24, 5, 1, 0.6, True, 1),
])
def test_backward_kernel_source_on_host_threads(host_bwd, T, H, I, E, k, cf, renorm, blocks):
    """The CUDA source itself (phases, tile queue, waits, grid barriers, fragment layouts,
    masks) run on the CPU equals its torch transcription and fp32 autograd through the
    reference; outputs, scratch, dropped pairs' outp rows and unused h rows are NaN."""
    import ctypes

    ins = _bwd_case(T, H, I, E, seed=T + E, dtype=torch.bfloat16, exact=True)
    cap = _capacity(cf, T, k, E)
    st = moe_fused.forward_torch(*ins, k, renorm, cap)
    P, n = T * k, int(st.off[-1])
    outp, h = st.outp.clone(), st.h.clone()
    outp[st.slot < 0] = float("nan")
    h[n:] = float("nan")
    st = moe_fused.MoeState(st.logits, st.tope, st.topw, st.slot, st.sorted, st.off, h, outp, None)
    g = torch.Generator().manual_seed(T)
    dy = torch.randn(T, H, generator=g).bfloat16()
    dlogits = torch.randn(T, E, generator=g) * 1e-2
    Ep = (E + 7) // 8 * 8

    def nan(*s):
        return torch.full(s, float("nan"), dtype=torch.bfloat16)

    outs = [nan(T, H), nan(E, H), nan(E, I, H), nan(E, I, H), nan(E, H, I)]
    status = torch.zeros(3, dtype=torch.int32)
    scratch = [nan(P, H), nan(T, Ep), nan(P, I), nan(P, I), nan(P, H), torch.zeros(E + 4, dtype=torch.int32),
               torch.zeros((P + 63) // 64 + E, dtype=torch.int32), status]
    args = outs + [dy, dlogits, *ins, st.logits, st.tope, st.topw, st.slot, st.sorted, st.off, st.h, st.outp] + scratch
    args = [t.contiguous() for t in args]  # the host blocks write them in place
    ptrs = (ctypes.c_void_p * len(args))(*[t.data_ptr() for t in args])
    ints = (ctypes.c_int * 8)(T, H, I, E, Ep, k, 1 if renorm else 0, 60000)
    assert host_bwd.run_flash_moe_bwd(ptrs, ints, blocks) == 0
    assert status.tolist() == [0, 0, 0]
    got = args[:5]
    emu = moe_fused.backward_emulate(st, dy, dlogits, *ins, k, renorm)
    fs = [t.float().requires_grad_() for t in ins]
    yr, _ = moe.flash_moe_reference(*fs, top_k=k, renormalize=renorm, capacity_factor=cf)
    want = torch.autograd.grad((yr * dy.float()).sum() + ((fs[0] @ fs[1].t()) * dlogits).sum(), fs)
    for name, a, b, c in zip(("dx", "dwr", "dw1", "dw3", "dw2"), got, emu, want):
        assert not a.isnan().any(), name
        assert rel(a, b) < 1e-3, name  # same rounding points; fp32 order flips a few bf16 roundings
        assert rel(a, c) < 2e-2, name


def test_gpu_moe_bench_counts_the_backward_flops_the_kernel_does(monkeypatch):
    """benches/gpu_moe.py's backward FLOPs against a count of the useful multiply-adds of every
    tile the kernel's transcription (backward_emulate: its tile list and tile shapes) runs."""
    import importlib.util
    import pathlib

    benches = pathlib.Path(__file__).resolve().parent.parent / "benches"
    monkeypatch.syspath_prepend(str(benches))
    spec = importlib.util.spec_from_file_location("gpu_moe_bench", benches / "gpu_moe.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    T, H, I, E, k = 64, 48, 40, 8, 2  # E a multiple of 8: the router operand has no padding
    ins = _bwd_case(T, H, I, E, seed=1)
    st = moe_fused.forward_torch(*ins, k, True, None)
    assert int(st.off[-1]) == T * k  # every pair kept
    counted = []
    tile_mma = moe_fused._tile_mma

    def extent(view, t0, trans, n):
        limit = view.ncols if trans else view.nrows
        return max(0, min(n, limit - t0))

    def counting(A, at0, ta, B, bt0, tb, K, bm, bn):
        counted.append(2 * extent(A, at0, ta, bm) * extent(B, bt0, tb, bn) * K)
        return tile_mma(A, at0, ta, B, bt0, tb, K, bm, bn)

    monkeypatch.setattr(moe_fused, "_tile_mma", counting)
    dy = torch.randn(T, H, generator=torch.Generator().manual_seed(2))
    moe_fused.backward_emulate(st, dy, None, *ins, k, True)
    fwd, bwd = bench.flops_of(T, H, I, E, k)
    assert sum(counted) == bwd
    assert bwd == 16 * T * k * H * I + 4 * T * E * H and bwd != 2 * fwd


def test_backward_kernel_and_emulation_validate():
    x, wr, w1, w3, w2 = _weights(4, 8, 8, 3)
    st = moe_fused.forward_torch(x, wr, w1, w3, w2, 1, True, None)
    with pytest.raises(HorizonError, match="backward kernel"):
        moe_fused.backward_kernel(st, torch.zeros(4, 8), None, x, wr, w1, w3, w2, 1, True)  # CPU fp32
    with pytest.raises(HorizonError, match="bm"):
        moe_fused.backward_emulate(st, torch.zeros(4, 8), None, x, wr, w1, w3, w2, 1, True, bm=0)


# ---------------------------------------------------------------- the forward kernel's source on host threads (CPU)


@pytest.fixture(scope="module")
def host_moe(tmp_path_factory):
    """cuda/moe/flash_moe.cu and flash_moe_bwd.cu (one unity translation unit, as the real
    build) compiled with g++ for the host runtime of tests/cuda_host/ (blocks as OS threads,
    CUDA threads as fibers, the mma.sync emulated per warp under HORIZON_HOST_MMA); the ops'
    own launches run on it (tests/cuda_host/hostbuild.py)."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "cuda_host"))
    import hostbuild

    return hostbuild.build_kernels(["moe/flash_moe.cu", "moe/flash_moe_bwd.cu"], tmp_path_factory.mktemp("host_moe"))


HOST_FWD_CASES = [
    # T, H, I, E, k, capacity_factor, renormalize, SMs, blocks per SM
    (150, 40, 72, 4, 2, None, True, 3, 1),  # 2 placement chunks, experts over several row blocks, 3 blocks
    (40, 24, 16, 12, 8, 0.5, False, 2, 2),  # top-8, capacity drops, 4 blocks
    (200, 16, 24, 5, 1, 0.6, True, 1, 1),  # top-1, capacity drops, K = H < BK, one block
    (1, 16, 8, 8, 2, None, True, 1, 2),  # one token: most blocks find no work
    (64, 16, 16, 40, 8, None, False, 2, 1),  # E > 32: lanes hold several experts; tied logits
]


@pytest.mark.parametrize("T,H,I,E,k,cf,renorm,sms,bps", HOST_FWD_CASES)
def test_forward_kernel_source_on_host_threads(host_moe, monkeypatch, T, H, I, E, k, cf, renorm, sms, bps):
    """horizon_flash_moe_fwd as forward_kernel launches it (grid, arguments, scratch), run on
    the CPU: the routing state equals forward_torch's exactly (router logits exact by
    construction, so top-k ties go the same way), h / outp / y within bf16 tolerance of it, and
    y of the fp32 reference on the same bf16 values. Outputs and scratch start NaN-poisoned."""
    import hostbuild

    host_moe.patch(monkeypatch, sms=sms, blocks_per_sm=bps)
    ins = _bwd_case(T, H, I, E, seed=T + E, dtype=torch.bfloat16, exact=True)
    cap = _capacity(cf, T, k, E)
    want = moe_fused.forward_torch(*ins, k, renorm, cap)
    counts = (want.off[1:] - want.off[:-1]).tolist()
    if E > 2 * k:
        assert counts[E - 1] == 0  # an expert with no tokens
    if cf is not None:
        assert int(want.off[-1]) < T * k  # capacity dropped pairs
    host_moe.launches.clear()
    host_moe.cooperative.clear()
    got = moe_fused.forward_kernel(*(hostbuild.fake(t) for t in ins), k, renorm, cap)
    assert host_moe.launches == [("horizon_flash_moe_fwd", (sms * bps,), (256,), 0)]
    assert host_moe.cooperative == [True]
    assert torch.equal(got.logits, want.logits)
    assert torch.equal(got.tope, want.tope)
    assert torch.equal(got.slot, want.slot)
    assert torch.equal(got.off, want.off)
    n = int(want.off[-1])
    assert torch.equal(got.sorted[:n], want.sorted[:n])
    assert rel(got.topw, want.topw) < 1e-5
    assert not got.h[:n].isnan().any() and rel(got.h[:n], want.h[:n]) < 2e-2
    keep = want.slot >= 0
    assert not got.outp[keep].isnan().any() and rel(got.outp[keep], want.outp[keep]) < 2e-2
    assert not got.y.isnan().any() and rel(got.y, want.y) < 2e-2
    fs = [t.float() for t in ins]
    yr, _ = moe.flash_moe_reference(*fs, top_k=k, renormalize=renorm, capacity_factor=cf)
    assert rel(got.y, yr) < 2e-2


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_a_grid_that_is_not_resident_gives_up_and_says_so(host_moe, monkeypatch, which):
    """Both kernels' waits are bounded: launched with one block that never starts (what a plain
    launch may meet beside another persistent kernel, under MPS or green contexts), the launch
    returns after the limit instead of hanging, and the next check raises a clear error."""
    import hostbuild

    T, H, I, E, k = 40, 16, 24, 4, 2
    host_moe.patch(monkeypatch, sms=2, blocks_per_sm=2)
    ins = [hostbuild.fake(t) for t in _bwd_case(T, H, I, E, seed=3, dtype=torch.bfloat16, exact=True)]
    if which == "backward":
        st = moe_fused.forward_kernel(*ins, k, True, None)  # all blocks resident: a good state
        moe_fused.check_status()
    monkeypatch.setattr(moe_fused, "_SPIN_LIMIT_MS", 300)
    host_moe.resident = 3  # of a grid of 4
    try:
        if which == "forward":
            moe_fused.forward_kernel(*ins, k, True, None)
        else:
            dy = hostbuild.fake(torch.randn(T, H, generator=torch.Generator().manual_seed(4)).bfloat16())
            moe_fused.backward_kernel(st, dy, None, *ins, k, True)
    finally:
        host_moe.resident = None
    kernel = moe_fused.KERNEL if which == "forward" else moe_fused.BWD_KERNEL
    assert host_moe.launches[-1][:2] == (kernel, (4,)) and host_moe.cooperative[-1]
    with pytest.raises(HorizonError, match=f"{kernel}.*waited over 300 ms.*not all resident"):
        moe_fused.check_status()
    moe_fused.check_status()  # reported once: the next launches start clean


@pytest.mark.parametrize("T,H,I,E,k,cf,renorm,sms,bps", HOST_FWD_CASES[:3])
def test_flash_moe_kernels_end_to_end_on_host_threads(host_moe, monkeypatch, T, H, I, E, k, cf, renorm, sms, bps):
    """horizon.moe.flash_moe down its CUDA path (forward kernel, then the backward kernel from
    autograd), both launches run on the CPU: y, aux and every gradient against fp32 autograd
    through the reference on the same bf16 values."""
    import hostbuild

    host_moe.patch(monkeypatch, sms=sms, blocks_per_sm=bps)
    monkeypatch.delenv("HORIZON_MOE_BWD", raising=False)
    ins = _bwd_case(T, H, I, E, seed=2 * T + E, dtype=torch.bfloat16, exact=True)
    kw = dict(top_k=k, renormalize=renorm, capacity_factor=cf, aux_loss_coef=0.01, z_loss_coef=0.001)
    host_moe.launches.clear()
    host_moe.cooperative.clear()
    xs = [hostbuild.fake(t).requires_grad_() for t in ins]
    y, aux = flash_moe(*xs, **kw)
    dy = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).bfloat16()
    got = torch.autograd.grad((y.float() * dy.float()).sum() + aux, xs)
    assert [c[0] for c in host_moe.launches] == ["horizon_flash_moe_fwd", "horizon_flash_moe_bwd"]
    fs = [t.float().requires_grad_() for t in ins]
    yr, auxr = moe.flash_moe_reference(*fs, **kw)
    want = torch.autograd.grad((yr * dy.float()).sum() + auxr, fs)
    assert rel(y, yr) < 2e-2 and abs(aux.item() - auxr.item()) <= 1e-3 * abs(auxr.item())
    for name, a, b in zip(("dx", "dwr", "dw1", "dw3", "dw2"), got, want):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape, name
        assert not a.isnan().any(), name
        assert rel(a, b) < 2e-2, name
