"""CPU AdamW (horizon.optim) against torch.optim.AdamW, the fused step with its bf16 copy,
the gradient reductions, state dicts, and bad input."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from horizon import HorizonError
from horizon._native import AdamW
from horizon.optim import CPUAdamW, all_finite, fused_adamw_, grad_sq_norm

# Sizes around the vector widths (8, 16) and the shard alignment, plus empty and scalar-like.
SHAPES = [(0,), (1,), (7,), (17,), (33,), (13, 29), (1000,), (3, 5, 7)]


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over elements of |a - b| / |b| (0 for empty tensors)."""
    if b.numel() == 0:
        return 0.0
    return ((a.double() - b.double()).abs() / b.double().abs()).max().item()


def make_params(seed: int):
    g = torch.Generator().manual_seed(seed)
    # Values bounded away from 0 so the element-wise relative error is a meaningful measure.
    return [torch.nn.Parameter((torch.rand(s, generator=g) + 0.5) * torch.sign(torch.randn(s, generator=g))) for s in SHAPES]


def groups(params):
    return [
        {"params": params[:3]},
        {"params": params[3:6], "lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1},
        {"params": params[6:], "lr": 5e-4, "weight_decay": 0.0},
    ]


def run_steps(opt, params, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 0.3
        opt.step()


def test_ten_steps_match_torch_adamw_with_param_groups():
    ours, ref = make_params(0), make_params(0)
    opt = CPUAdamW(groups(ours), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    topt = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, foreach=False)
    run_steps(opt, ours, 10, seed=1)
    run_steps(topt, ref, 10, seed=1)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        assert max_rel_err(a.detach(), b.detach()) <= 1e-6, f"shape {tuple(a.shape)}"
        sa, sb = opt.state[a], topt.state[b]
        if a.numel():
            assert int(sa["step"]) == int(sb["step"]) == 10
            # moments: compared relative to their scale (they cross zero)
            for k in ("exp_avg", "exp_avg_sq"):
                scale = sb[k].abs().max().item()
                assert (sa[k] - sb[k]).abs().max().item() <= 1e-6 * scale, k


def test_fused_step_with_bf16_copy_and_grad_scale_matches_torch():
    n = 4099  # not a multiple of any vector width
    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(n, generator=g) + 3.0
    p, ref = p0.clone(), torch.nn.Parameter(p0.clone())
    m, v = torch.zeros(n), torch.zeros(n)
    w = torch.empty(n, dtype=torch.bfloat16)
    topt = torch.optim.AdamW([ref], lr=2e-3, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.05, foreach=False)
    for step in range(1, 6):
        grad = torch.randn(n, generator=g)
        fused_adamw_(p, grad, m, v, hyper=AdamW(2e-3, 0.85, 0.99, 1e-7, 0.05), step=step, grad_scale=0.25,
                     bf16_out=w)
        ref.grad = grad * 0.25
        topt.step()
    assert max_rel_err(p, ref.detach()) <= 1e-6
    # the bf16 copy is p rounded to nearest even: exactly torch's own conversion
    assert torch.equal(w.view(torch.int16), p.to(torch.bfloat16).view(torch.int16))


def test_bf16_copy_keeps_nan_and_rounds_like_torch_on_odd_values():
    vals = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8,
                         3.4e38, 1e-40, -2.5], dtype=torch.float32)
    n = vals.numel()
    p = vals.clone()
    w = torch.empty(n, dtype=torch.bfloat16)
    # lr 0, no decay, zero gradient: p is unchanged and the copy is its rounding
    fused_adamw_(p, torch.zeros(n), torch.zeros(n), torch.zeros(n), hyper=AdamW(0.0, 0.9, 0.999, 1e-8, 0.0), step=1,
                 bf16_out=w)
    assert torch.isnan(w[0])
    assert torch.equal(w[1:].view(torch.int16), vals[1:].to(torch.bfloat16).view(torch.int16))


def test_state_dict_round_trip_and_exchange_with_torch():
    a, b = make_params(5), make_params(5)
    opt_a = CPUAdamW(groups(a), lr=1e-2)
    run_steps(opt_a, a, 3, seed=7)
    # a fresh optimizer on copies of the parameters, loaded from opt_a's state dict
    for pb, pa in zip(b, a):
        pb.data.copy_(pa.data)
    opt_b = CPUAdamW(groups(b), lr=1.0)  # hyper-parameters come from the state dict
    # deep copy: state_dict() shares its tensors, as a save/load round trip would not
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.param_groups[1]["lr"] == 3e-3 and opt_b.param_groups[0]["lr"] == 1e-2
    run_steps(opt_a, a, 2, seed=8)
    run_steps(opt_b, b, 2, seed=8)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)

    # torch.optim.AdamW state -> CPUAdamW, continuing exactly like torch would
    t, c = make_params(9), make_params(9)
    topt = torch.optim.AdamW(groups(t), lr=1e-2, foreach=False)
    run_steps(topt, t, 4, seed=10)
    for pc, pt in zip(c, t):
        pc.data.copy_(pt.data)
    copt = CPUAdamW(groups(c), lr=1e-2)
    copt.load_state_dict(copy.deepcopy(topt.state_dict()))
    run_steps(topt, t, 3, seed=11)
    run_steps(copt, c, 3, seed=11)
    for pc, pt in zip(c, t):
        assert max_rel_err(pc.detach(), pt.detach()) <= 1e-6

    # A loaded state in another layout (float64, transposed): each property alone is converted
    # to the dense fp32 the kernel reads, and the run continues like torch's.
    for change in ("float64", "transposed"):
        t, c = make_params(12), make_params(12)
        topt = torch.optim.AdamW(groups(t), lr=1e-2, foreach=False)
        run_steps(topt, t, 2, seed=13)
        for pc, pt in zip(c, t):
            pc.data.copy_(pt.data)
        sd = copy.deepcopy(topt.state_dict())
        for st in sd["state"].values():
            for key in ("exp_avg", "exp_avg_sq"):
                if change == "float64":
                    st[key] = st[key].double()
                elif st[key].dim() == 2:
                    st[key] = st[key].t().contiguous().t()  # same values, column-major
        copt = CPUAdamW(groups(c), lr=1e-2)
        copt.load_state_dict(sd)
        run_steps(topt, t, 2, seed=14)
        run_steps(copt, c, 2, seed=14)
        for pc, pt in zip(c, t):
            assert max_rel_err(pc.detach(), pt.detach()) <= 1e-6, change


def test_non_contiguous_param_and_missing_grads():
    base = torch.randn(6, 9) + 2.0
    p = torch.nn.Parameter(base.clone().t())  # non-contiguous leaf
    q = torch.nn.Parameter(torch.ones(4))  # never gets a gradient
    ref = torch.nn.Parameter(base.clone().t())
    opt = CPUAdamW([p, q], lr=1e-2)
    topt = torch.optim.AdamW([ref], lr=1e-2, foreach=False)
    for _ in range(3):
        grad = torch.randn(9, 6)
        p.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        topt.step()
    assert max_rel_err(p.detach(), ref.detach()) <= 1e-6
    assert torch.equal(q.detach(), torch.ones(4)) and len(opt.state[q]) == 0


def test_closure_is_called_and_its_loss_returned():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = CPUAdamW([p])

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    assert p.grad is not None and int(opt.state[p]["step"]) == 1


def test_squared_norm_and_finite_check():
    g = torch.Generator().manual_seed(2)
    for n in (0, 1, 17, 70_001):
        t = torch.randn(n, generator=g) * 5
        want = float((t.double() ** 2).sum())
        assert grad_sq_norm(t) == pytest.approx(want, rel=1e-12, abs=0.0)
        assert all_finite(t)
        if n:
            for bad in (float("nan"), float("inf"), -float("inf")):
                u = t.clone()
                u[n // 2] = bad
                assert not all_finite(u)


def test_results_do_not_depend_on_simd_path_or_thread_count():
    # Each configuration runs in a fresh process: the SIMD level and the pool size are fixed
    # per process (HORIZON_SIMD, HORIZON_ADAM_THREADS). 100_003 elements use the pool.
    script = textwrap.dedent(
        """
        import hashlib, torch
        from horizon._native import AdamW
        from horizon.optim import fused_adamw_, grad_sq_norm, adam_config
        g = torch.Generator().manual_seed(0)
        n = 100_003
        p, m, v = torch.randn(n, generator=g), torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g)
        w = torch.empty(n, dtype=torch.bfloat16)
        for step in (1, 2, 3):
            grad = torch.randn(n, generator=g)
            fused_adamw_(p, grad, m, v, hyper=AdamW(1e-2, 0.9, 0.999, 1e-8, 0.1), step=step, grad_scale=0.7,
                         bf16_out=w)
        h = hashlib.sha256()
        for t in (p, m, v, w.view(torch.int16)):
            h.update(t.numpy().tobytes())
        print(adam_config()["simd"], adam_config()["threads"], h.hexdigest(), grad_sq_norm(grad).hex())
        """
    )
    configs = [("scalar", "1"), ("avx2", "3"), ("", "2")]
    seen = {}
    for simd, threads in configs:
        env = dict(os.environ, HORIZON_SIMD=simd, HORIZON_ADAM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        level, nthreads, digest, norm = out.stdout.split()
        assert nthreads == threads
        seen[(level, threads)] = (digest, norm)
    assert len(set(seen.values())) == 1, seen


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match=r"^lr must be a finite number >= 0, got -0\.001$"):
        CPUAdamW([torch.nn.Parameter(torch.ones(2))], lr=-1e-3)
    with pytest.raises(ValueError, match="beta2"):
        CPUAdamW([torch.nn.Parameter(torch.ones(2))], betas=(0.9, 1.0))
    with pytest.raises(HorizonError, match="float32"):
        CPUAdamW([torch.nn.Parameter(torch.ones(2, dtype=torch.float64))])
    with pytest.raises(HorizonError, match="float32"):
        CPUAdamW([torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))])
    with pytest.raises(HorizonError, match="meta"):
        CPUAdamW([torch.nn.Parameter(torch.ones(2, device="meta"))])

    p = torch.nn.Parameter(torch.ones(4))
    opt = CPUAdamW([p])
    p.grad = torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (4,), check_invariants=True)
    with pytest.raises(HorizonError, match="sparse"):
        opt.step()
    opt.param_groups[0]["lr"] = -0.5  # e.g. a broken scheduler
    p.grad = torch.ones(4)
    with pytest.raises(ValueError, match=r"^lr must be a finite number >= 0, got -0\.5$"):
        opt.step()

    x, m, v = torch.ones(8), torch.zeros(8), torch.zeros(8)
    hp = AdamW(1e-3, 0.9, 0.999, 1e-8, 0.0)
    with pytest.raises(HorizonError, match="elements"):
        fused_adamw_(x, torch.ones(7), m, v, hyper=hp, step=1)
    with pytest.raises(HorizonError, match="overlap"):
        fused_adamw_(x, torch.ones(8), m, m, hyper=hp, step=1)
    with pytest.raises(HorizonError, match="contiguous"):
        fused_adamw_(torch.ones(4, 4).t(), torch.ones(16), torch.zeros(16), torch.zeros(16), hyper=hp, step=1)
    with pytest.raises(HorizonError, match="bfloat16"):
        fused_adamw_(x, torch.ones(8), m, v, hyper=hp, step=1, bf16_out=torch.empty(8))
    with pytest.raises(ValueError, match="step"):
        fused_adamw_(x, torch.ones(8), m, v, hyper=hp, step=0)
    with pytest.raises(ValueError, match="grad_scale"):
        fused_adamw_(x, torch.ones(8), m, v, hyper=hp, step=1, grad_scale=float("inf"))
    with pytest.raises(HorizonError, match="hyper must be a horizon._native.AdamW"):
        fused_adamw_(x, torch.ones(8), m, v, hyper=dict(lr=1e-3), step=1)
    with pytest.raises(HorizonError, match="float32"):
        grad_sq_norm(torch.ones(3, dtype=torch.float16))
    with pytest.raises(HorizonError, match="meta"):
        all_finite(torch.ones(3, device="meta"))


def test_large_state_lives_in_the_arena_and_survives_save_and_load(tmp_path):
    n = 70_001  # above STATE_IN_ARENA_MIN: moments live in Horizon host mappings
    g = torch.Generator().manual_seed(4)
    a = torch.nn.Parameter(torch.randn(n, generator=g) + 3.0)
    ref = torch.nn.Parameter(a.detach().clone())
    opt = CPUAdamW([a], lr=1e-2)
    topt = torch.optim.AdamW([ref], lr=1e-2, foreach=False)
    grads = [torch.randn(n, generator=g) for _ in range(4)]
    for grad in grads[:2]:
        a.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        topt.step()
    assert opt.state[a]["exp_avg"].data_ptr() % 4096 == 0  # page-aligned arena mapping
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    del opt
    b = torch.nn.Parameter(a.detach().clone())
    opt2 = CPUAdamW([b], lr=1e-2)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    for grad in grads[2:]:
        b.grad, ref.grad = grad.clone(), grad.clone()
        opt2.step()
        topt.step()
    assert max_rel_err(b.detach(), ref.detach()) <= 1e-6


def test_adamw_hyper_parameters_are_one_validated_value():
    h = AdamW(1e-3, 0.9, 0.999, 1e-8, 0.01)
    assert (h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.betas) == (1e-3, 0.9, 0.999, 1e-8, 0.01, (0.9, 0.999))
    assert repr(h) == "AdamW(lr=0.001, beta1=0.9, beta2=0.999, eps=1e-08, weight_decay=0.01)"
    assert AdamW(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01) == h
    assert hash(AdamW(1e-3, 0.9, 0.999, 1e-8, 0.01)) == hash(h) and h != AdamW(1e-3, 0.9, 0.999, 1e-8, 0.0)
    assert h != (1e-3, 0.9, 0.999, 1e-8, 0.01)
    # immutable: a new learning rate is a new (checked) object; 0 is a valid rate (end of a schedule)
    z = h.with_lr(0)
    assert z == AdamW(0.0, 0.9, 0.999, 1e-8, 0.01) and h.lr == 1e-3
    with pytest.raises(AttributeError):
        h.lr = 1.0
    assert copy.deepcopy(h) == h
    import pickle

    assert pickle.loads(pickle.dumps(h)) == h
    # ints and other real numbers (numpy scalars, one-element tensors) are numbers
    assert AdamW(1, 0, 0, 1, 0).lr == 1.0
    assert AdamW(torch.tensor(0.5), 0.9, 0.99, 1e-8, 0).lr == 0.5
    import numpy as np

    assert AdamW(np.float32(0.5), 0.9, 0.99, 1e-8, 0).lr == 0.5
    with pytest.raises(ValueError, match="^lr must be a finite number >= 0, got "):
        AdamW(np.True_, 0.9, 0.99, 1e-8, 0)


@pytest.mark.parametrize(
    "args, message",
    [
        (("1e-3", 0.9, 0.999, 1e-8, 0.0), "lr must be a finite number >= 0, got '1e-3'"),
        ((True, 0.9, 0.999, 1e-8, 0.0), "lr must be a finite number >= 0, got True"),
        ((-1e-3, 0.9, 0.999, 1e-8, 0.0), "lr must be a finite number >= 0, got -0.001"),
        ((float("nan"), 0.9, 0.999, 1e-8, 0.0), "lr must be a finite number >= 0, got nan"),
        ((float("inf"), 0.9, 0.999, 1e-8, 0.0), "lr must be a finite number >= 0, got inf"),
        ((None, 0.9, 0.999, 1e-8, 0.0), "lr must be a finite number >= 0, got None"),
        ((1e-3, 1.0, 0.999, 1e-8, 0.0), "beta1 (betas[0]) must be a finite number in [0, 1), got 1.0"),
        ((1e-3, -0.1, 0.999, 1e-8, 0.0), "beta1 (betas[0]) must be a finite number in [0, 1), got -0.1"),
        ((1e-3, 0.9, 1, 1e-8, 0.0), "beta2 (betas[1]) must be a finite number in [0, 1), got 1"),
        ((1e-3, 0.9, False, 1e-8, 0.0), "beta2 (betas[1]) must be a finite number in [0, 1), got False"),
        ((1e-3, 0.9, 0.999, 0.0, 0.0), "eps must be a finite number > 0, got 0.0"),
        ((1e-3, 0.9, 0.999, "1e-8", 0.0), "eps must be a finite number > 0, got '1e-8'"),
        ((1e-3, 0.9, 0.999, 1e-8, -0.1), "weight_decay must be a finite number >= 0, got -0.1"),
        ((1e-3, 0.9, 0.999, 1e-8, [0.1]), "weight_decay must be a finite number >= 0, got [0.1]"),
    ],
)
def test_adamw_refuses_each_bad_value_in_one_line(args, message):
    with pytest.raises(ValueError) as e:
        AdamW(*args)
    assert str(e.value) == message
    if args[0] == -1e-3:
        with pytest.raises(ValueError, match="^lr must be a finite number >= 0, got -0.001$"):
            AdamW(1e-3, 0.9, 0.999, 1e-8, 0.0).with_lr(-1e-3)


def test_cpu_adamw_validates_through_the_one_rule():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError) as e:
        CPUAdamW([p], lr="1e-3")
    assert str(e.value) == "lr must be a finite number >= 0, got '1e-3'"
    with pytest.raises(ValueError, match=r"^eps must be a finite number > 0, got 0$"):
        CPUAdamW([p], eps=0)
    with pytest.raises(ValueError, match="betas must be a pair"):
        CPUAdamW([p], betas=0.9)
    with pytest.raises(ValueError, match=r"^weight_decay must be a finite number >= 0, got True$"):
        CPUAdamW([{"params": [p], "weight_decay": True}])
    # lr 0 (a schedule's end) is a valid step that leaves p unchanged without decay
    opt = CPUAdamW([p], lr=0.0, weight_decay=0.0)
    p.grad = torch.ones(2)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(2))
