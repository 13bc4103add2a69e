"""The host store: slabs and host buffers are Rust memory seen by torch without copies, stay
alive as long as any tensor views them, land on the requested NUMA node, and lay parameters
out at aligned offsets."""

import gc
import pathlib

import pytest
import torch

from horizon import HorizonError, _native
from horizon.store import LayerSlab, SlabLayout, host_buffer, numa_pages, probe

PAGE = 4096


def _mapped(address: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return True
    return False


def test_slab_parts_have_the_right_kind_and_are_zeroed_aligned_and_disjoint():
    n = 1001  # not a multiple of any vector width
    s = LayerSlab(n, with_grad=True, pin=True)
    parts = {
        "master": (s.master, torch.float32),
        "exp_avg": (s.exp_avg, torch.float32),
        "exp_avg_sq": (s.exp_avg_sq, torch.float32),
        "grad": (s.grad, torch.float32),
        "weights_bf16": (s.weights_bf16, torch.bfloat16),
    }
    spans = []
    for name, (t, dtype) in parts.items():
        assert t.dtype == dtype and t.shape == (n,) and t.device.type == "cpu", name
        assert t.is_contiguous()
        assert t.data_ptr() % PAGE == 0, f"{name} not page-aligned"
        assert torch.count_nonzero(t).item() == 0, f"{name} not zeroed"
        assert t.data_ptr() == s._native.address + s._native.offset(name)
        spans.append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "parts overlap"
    assert s.numel == n and s.nbytes >= spans[-1][1] - spans[0][0]
    assert LayerSlab(7).grad is None


def test_writes_from_either_side_are_seen_by_the_other_without_copies():
    s = LayerSlab(5000)
    # A second export of the same part is the same memory, not a copy.
    again = torch.from_dlpack(s._native.dlpack("master"))
    assert again.data_ptr() == s.master.data_ptr()
    g = torch.Generator().manual_seed(0)
    s.master.copy_(torch.randn(5000, generator=g))
    s.master[17] = float("nan")
    s.master[18] = 1.0 + 2.0**-8  # an exact bf16 tie: rounds to even
    assert again[17].isnan() and again[18].item() == 1.0 + 2.0**-8
    # Rust writes the bf16 copy from what torch wrote; torch's own cast is the oracle.
    s.sync_weights_bf16()
    want = s.master.to(torch.bfloat16)
    got = s.weights_bf16
    assert got[17].isnan()
    mask = ~want.isnan()
    assert torch.equal(got[mask].view(torch.int16), want[mask].view(torch.int16))
    # Rust reads what torch wrote.
    s.exp_avg_sq.copy_(torch.randn(5000, generator=g))
    ref = (s.exp_avg_sq.double() ** 2).sum().item()
    assert s._native.sq_norm("exp_avg_sq") == pytest.approx(ref, rel=1e-12)


def test_a_tensor_outlives_the_slab_handle_and_the_last_view_unmaps():
    s = LayerSlab(3 << 20)  # 12 MiB per part: a huge-page-aligned layout
    addr = s._native.address
    master = s.master
    master.fill_(2.5)
    del s
    gc.collect()
    assert _mapped(addr)
    assert torch.all(master == 2.5)
    master.add_(1.0)  # still writable
    assert master[-1].item() == 3.5
    del master
    gc.collect()
    assert not _mapped(addr), "the mapping outlived its last view"


def test_an_unconsumed_capsule_keeps_the_memory_and_releases_it_when_dropped():
    s = LayerSlab(1000)
    addr = s._native.address
    cap = s._native.dlpack("exp_avg")
    del s
    gc.collect()
    assert _mapped(addr)
    del cap
    gc.collect()
    assert not _mapped(addr)


def test_pages_land_on_the_requested_node():
    node = _native_nodes()[-1]["id"]  # on a multi-node machine, not necessarily the local one
    n = 2 << 20  # 8 MiB per fp32 part
    s = LayerSlab(n, numa_node=node)
    p = s.placement
    assert p["numa_node"] == node
    _assert_bound_or_why(p)
    assert p["prefault_threads"] >= 1
    found = numa_pages(s.master)
    if found is None:
        # Only a kernel that does not report pages per node may leave us without an answer.
        import re

        try:
            reports = bool(re.search(r" N\d+=\d+", pathlib.Path("/proc/self/numa_maps").read_text()))
        except OSError:
            reports = False
        assert not reports, "/proc/self/numa_maps reports pages per node, but numa_pages found none"
        pytest.skip("this kernel has no per-node page counts in /proc/self/numa_maps")
    pages, kib = found
    resident = sum(pages.values()) * kib * 1024
    assert resident >= s.nbytes, f"pre-fault left pages out: {pages}"
    if p["bound"] or len(_native_nodes()) == 1:
        assert set(pages) == {node}, f"pages off node {node}: {pages}"


def _native_nodes():
    from horizon import native

    return native.system_info()["numa_nodes"]


def _assert_bound_or_why(p):
    """A slab bound to a node requested on a multi-node machine, or the one reason it was not:
    a single node needs no binding; otherwise the kernel refused mbind, and the note says how."""
    if len(_native_nodes()) <= 1:
        assert not p["bound"] and p["bind_note"] == "single NUMA node: binding not needed", p
    else:
        assert p["bound"] or p["bind_note"].startswith("mbind"), p


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int32, torch.int64, torch.float64]
)
def test_host_buffer_is_an_aligned_zeroed_tensor_of_the_dtype(dtype):
    t = host_buffer(1234, dtype)
    assert t.dtype == dtype and t.shape == (1234,) and t.data_ptr() % PAGE == 0
    assert torch.count_nonzero(t).item() == 0
    t.fill_(3)
    assert int(t.sum(dtype=torch.float64).item()) == 3 * 1234
    assert host_buffer(0).numel() == 0


def test_bad_input_is_refused_with_the_value_named():
    with pytest.raises(HorizonError, match="-1"):
        LayerSlab(-1)
    with pytest.raises(HorizonError, match="numel"):
        LayerSlab("12")
    with pytest.raises(HorizonError, match="999"):
        LayerSlab(10, numa_node=999)
    with pytest.raises(HorizonError, match="numa_node"):
        host_buffer(10, numa_node=-2)
    with pytest.raises(HorizonError, match="complex64"):
        host_buffer(10, torch.complex64)
    s = LayerSlab(10)
    with pytest.raises(HorizonError, match="nope"):
        s._native.dlpack("nope")
    with pytest.raises(HorizonError, match="grad"):
        s._native.dlpack("grad")
    with pytest.raises(HorizonError, match="exceeds"):
        _native.HostRegion(100).dlpack(0, 10_000, "float32")


def test_layout_offsets_are_aligned_and_views_share_the_slab():
    shapes = {"wq": (8, 8), "bias": (3,), "empty": (0,), "norm": (5,), "w2": (2, 7)}
    lay = SlabLayout.from_shapes(shapes)
    assert list(lay.offsets) == list(shapes)
    assert all(o % 16 == 0 for o in lay.offsets.values())
    spans = sorted((lay.offsets[k], lay.offsets[k] + lay.span(k)[1]) for k in shapes)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert lay.numel % 16 == 0 and lay.numel >= spans[-1][1]
    s = LayerSlab(lay.numel)
    views = lay.views(s.master)
    for k, shape in shapes.items():
        assert views[k].shape == shape
        if views[k].numel():
            assert views[k].data_ptr() == s.master.data_ptr() + 4 * lay.offsets[k]
    views["norm"].fill_(7.0)
    off = lay.offsets["norm"]
    assert torch.all(s.master[off : off + 5] == 7.0) and s.master.sum().item() == 35.0
    with pytest.raises(HorizonError, match="at least"):
        lay.views(torch.zeros(lay.numel - 1))
    with pytest.raises(HorizonError, match="wq"):
        SlabLayout.from_shapes({"wq": (8, -1)})
    with pytest.raises(HorizonError, match="missing"):
        lay.span("missing")


@pytest.mark.gpu
def test_pinned_parts_are_page_locked_for_the_gpu():
    s = LayerSlab(1 << 20, with_grad=True, pin=True)
    assert s.placement["pinned_bytes"] >= (1 << 20) * 6, s.placement
    assert s.weights_bf16.is_pinned() and s.grad.is_pinned()
    assert not s.master.is_pinned()
    s.master.normal_()
    s.sync_weights_bf16()
    d = s.weights_bf16.to("cuda", non_blocking=True)
    back = host_buffer(1 << 20, torch.bfloat16)
    assert back.is_pinned()
    back.copy_(d, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(back.view(torch.int16), s.master.to(torch.bfloat16).view(torch.int16))


def test_the_fused_step_on_a_slab_matches_torch_adamw_and_refreshes_the_bf16_copy():
    # The engine's path: master, moments, gradient buffer and bf16 copy all live in one slab.
    from horizon.optim import fused_adamw_

    n = 4099
    s = LayerSlab(n, with_grad=True)
    g = torch.Generator().manual_seed(3)
    # Bounded away from 0, so the element-wise relative error is a meaningful measure.
    u = torch.rand(n, generator=g)
    s.master.copy_(torch.where(u < 0.5, -0.5 - u, u))
    ref = torch.nn.Parameter(s.master.clone())
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = torch.optim.AdamW([ref], **hp)
    hyper = _native.AdamW(hp["lr"], *hp["betas"], hp["eps"], hp["weight_decay"])
    for step in range(1, 6):
        grad = torch.randn(n, generator=g)
        s.grad.copy_(grad * 2.0)
        ref.grad = grad
        opt.step()
        fused_adamw_(
            s.master, s.grad, s.exp_avg, s.exp_avg_sq, hyper=hyper, step=step, grad_scale=0.5, bf16_out=s.weights_bf16
        )
    rel = ((s.master - ref.detach()).abs() / ref.detach().abs()).max().item()
    assert rel <= 1e-6, rel
    torch.testing.assert_close(s.exp_avg_sq, opt.state[ref]["exp_avg_sq"], rtol=1e-6, atol=0)
    assert torch.equal(s.weights_bf16.view(torch.int16), s.master.to(torch.bfloat16).view(torch.int16))


def test_probe_reports_the_placement_for_doctor():
    p = probe()
    assert set(p) >= {"numa_node", "bound", "bind_note", "huge_pages_note", "pinned_bytes", "pin_note", "pages_per_node"}
    _assert_bound_or_why(p)
    if not _native.cuda_driver_present():
        assert p["pinned_bytes"] == 0 and "driver" in p["pin_note"]
    if p["pages_per_node"] is not None:
        assert sum(p["pages_per_node"].values()) * 4096 >= 4 << 20
