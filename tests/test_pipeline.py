"""The transfer pipeline on the CPU device: slot protocol, copies by the Rust lanes, and the
gradient hand-off to AdamW, checked against torch.optim.AdamW."""

import pytest
import torch

from horizon import HorizonError, _native
from horizon.engine.pipeline import GradientLanding, WeightStream


def test_slot_ring_protocol():
    r = _native.SlotRing(2)
    a, b = r.try_acquire(), r.try_acquire()
    assert {a, b} == {0, 1} and r.try_acquire() is None and r.free_count == 0
    r.release(a)
    assert r.free_count == 1
    with pytest.raises(HorizonError):
        r.release(5)
    r.release(b)
    with pytest.raises(HorizonError, match="twice"):
        r.release(b)
    with pytest.raises(HorizonError):
        _native.SlotRing(0)


def test_weight_stream_delivers_each_layer_and_counts_bytes():
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(n, generator=g) for n in (100, 37, 100, 64, 1)]
    ws = WeightStream(2, 100, "cpu", torch.float32)
    ws.prefetch(0, layers[0])
    ws.prefetch(1, layers[1])
    with pytest.raises(HorizonError, match="no free weight slot"):
        ws.prefetch(2, layers[2])
    for i in range(len(layers)):
        w = ws.acquire(i)
        assert w.data_ptr() != layers[i].data_ptr()  # a copy into the slot, not the source
        assert torch.equal(w, layers[i])
        ws.release(i)
        if i + 2 < len(layers):
            ws.prefetch(i + 2, layers[i + 2])
    assert ws.bytes_h2d == sum(t.numel() * 4 for t in layers)
    assert ws.device_bytes == 2 * 100 * 4


def test_weight_stream_rejects_bad_input():
    ws = WeightStream(2, 10, "cpu", torch.float32)
    with pytest.raises(HorizonError, match="does not fit"):
        ws.prefetch("a", torch.zeros(11))
    with pytest.raises(HorizonError, match="dtype"):
        ws.prefetch("a", torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(HorizonError, match="not prefetched"):
        ws.acquire("nope")
    with pytest.raises(HorizonError, match="at least 2"):
        WeightStream(1, 10, "cpu", torch.float32)


class _Slab:
    """A stand-in with the LayerSlab attributes the landing uses (plain torch memory)."""

    def __init__(self, p, with_grad=False):
        self.numel = p.numel()
        self.master = p.clone()
        self.exp_avg = torch.zeros_like(p)
        self.exp_avg_sq = torch.zeros_like(p)
        self.grad = torch.zeros_like(p) if with_grad else None
        self.weights_bf16 = torch.zeros(p.numel(), dtype=torch.bfloat16)


def _hyper(hp):
    """The engine's AdamW object from torch-style keyword arguments."""
    return _native.AdamW(hp["lr"], *hp["betas"], hp["eps"], hp["weight_decay"])


def _torch_adamw(p0, grads, lr, betas, eps, wd, scales=None):
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for i, gr in enumerate(grads):
        p.grad = gr.clone() * (1.0 if scales is None else scales[i])
        opt.step()
    return p.detach()


@pytest.mark.parametrize("n", [1, 17, 1000])
def test_landing_runs_adamw_straight_from_the_slot(n):
    g = torch.Generator().manual_seed(n)
    p0 = torch.randn(n, generator=g)
    grads = [torch.randn(n, generator=g) for _ in range(4)]
    slab = _Slab(p0)
    land = GradientLanding(2, 1000, "cpu")
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step, gr in enumerate(grads, start=1):
        land.land_and_update("L", gr, slab, hyper=_hyper(hp), step=step, write_bf16=True)
        land.wait("L")
    ref = _torch_adamw(p0, grads, hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"])
    torch.testing.assert_close(slab.master, ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(slab.weights_bf16, slab.master.to(torch.bfloat16))
    assert land.bytes_d2h == 4 * n * 4


def test_landing_through_the_gradient_buffer_with_scaling():
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(257, generator=g)
    grads = [torch.randn(257, generator=g) for _ in range(3)]
    slab = _Slab(p0, with_grad=True)
    land = GradientLanding(1, 257, "cpu")
    scales = [0.5, 1.0, 0.25]
    hp = dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for step, (gr, sc) in enumerate(zip(grads, scales), start=1):
        land.land_to_buffer("L", gr, slab)
        land.update_from_buffer("L", slab, hyper=_hyper(hp), step=step, grad_scale=sc, write_bf16=False)
        land.wait("L")
        assert torch.equal(slab.grad, gr)
    ref = _torch_adamw(p0, grads, hp["lr"], hp["betas"], hp["eps"], 0.0, scales)
    torch.testing.assert_close(slab.master, ref, rtol=1e-6, atol=1e-7)


def test_landing_rejects_mismatched_gradients():
    slab = _Slab(torch.zeros(10))
    land = GradientLanding(1, 10, "cpu")
    with pytest.raises(HorizonError, match="elements"):
        land.land_and_update("L", torch.zeros(9), slab, hyper=_native.AdamW(1e-3, 0.9, 0.99, 1e-8, 0.0), step=1,
                             write_bf16=False)
    with pytest.raises(HorizonError, match="float32"):
        land.land_to_buffer("L", torch.zeros(10, dtype=torch.float64), slab)
    with pytest.raises(HorizonError, match="no gradient buffer"):
        land.land_to_buffer("L", torch.zeros(10), slab)


def test_landing_skips_a_nonfinite_gradient_in_the_worker():
    from horizon import _native as nat

    pipe = nat.Pipeline()  # its own counters
    g = torch.Generator().manual_seed(2)
    p0 = torch.randn(50, generator=g)
    slab = _Slab(p0)
    land = GradientLanding(1, 50, "cpu", pipeline=pipe)
    bad = torch.randn(50, generator=g)
    bad[17] = float("nan")
    hyper = nat.AdamW(1e-2, 0.9, 0.99, 1e-8, 0.0)
    land.land_and_update("L", bad, slab, hyper=hyper, step=1, write_bf16=False, skip_nonfinite=True)
    land.wait("L")
    assert torch.equal(slab.master, p0) and not slab.exp_avg.any()
    assert land.skipped_updates == 1
    good = torch.randn(50, generator=g)
    land.land_and_update("L", good, slab, hyper=hyper, step=1, write_bf16=False, skip_nonfinite=True)
    land.wait("L")
    ref = _torch_adamw(p0, [good], 1e-2, (0.9, 0.99), 1e-8, 0.0)
    torch.testing.assert_close(slab.master, ref, rtol=1e-6, atol=1e-7)
    assert land.skipped_updates == 1


def test_pipeline_adam_takes_the_hyper_parameters_whole():
    pipe = _native.Pipeline()
    p, g, m, v = torch.ones(8), torch.ones(8), torch.zeros(8), torch.zeros(8)
    ptrs = (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), 0, 8)
    with pytest.raises(TypeError, match="hyper"):
        pipe.adam(*ptrs, hyper=dict(lr=1e-3), step=1)
    with pytest.raises(TypeError, match="lr"):
        pipe.adam(*ptrs, step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    with pytest.raises(HorizonError, match="step counts from 1"):
        pipe.adam(*ptrs, hyper=_native.AdamW(1e-3, 0.9, 0.999, 1e-8, 0.0), step=0)
    # lr 0 and no decay: a queued step leaves p as it was (and writes the moments)
    pipe.adam(*ptrs, hyper=_native.AdamW(0.0, 0.9, 0.999, 1e-8, 0.0), step=1).wait()
    assert torch.equal(p, torch.ones(8)) and torch.allclose(m, torch.full((8,), 0.1))
