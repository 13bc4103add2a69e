"""GPU benchmark of the fused layer kernels (issue 5): each kernel against torch eager and
torch.compile (as ratios, same run), and its achieved GB/s against a device-to-device copy
measured in the same run. Usage: python benches/gpu_kernels.py --out FILE.jsonl
[--compile-budget S]: the torch.compile peers compile only while their compile time stays
within S seconds (0: none), so the benchmark fits a time budget. Each row is appended to the
JSON Lines file as it is measured. Without a GPU it says so and exits 0."""

from __future__ import annotations

import argparse
import sys
import time

from cuda_timing import median_ms
from gpu_rows import Rows


def bench(fn, iters=50, warmup=10):
    return median_ms(fn, iters=iters, warmup=warmup)


def compiled(fn):
    import torch

    try:
        c = torch.compile(fn)
        return c
    except Exception:  # pragma: no cover - compile unavailable
        return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--compile-budget", type=float, default=600.0,
                    help="seconds torch.compile may spend compiling peers (0: no compiled peers)")
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA GPU on this machine; nothing measured")
        return 0
    from horizon import kernels as K
    from horizon.kernels import cross_entropy, norm, rope

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    out = Rows(args.out, "gpu_kernels")
    out.add({"device": name})
    compile_left = [args.compile_budget]

    # Ceiling: a large device-to-device copy (bytes read + written per second).
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), iters=20)
    copy_gbs = 2 * src.numel() / ms / 1e6
    out.add({"copy_GBps": copy_gbs})
    del src, dst

    R, H = args.rows, args.hidden
    x = torch.randn(R, H, device=dev).bfloat16()
    w = torch.randn(H, device=dev).bfloat16()
    dy = torch.randn_like(x)

    def row(label, ours, eager, nbytes):
        t_ours = bench(ours)
        t_eager = bench(eager)
        t_comp = float("nan")
        if compile_left[0] > 0:  # the compiled peer, while the compile budget lasts
            t0 = time.monotonic()
            c = compiled(eager)
            if c is not None:
                c()  # compiles here
                compile_left[0] -= time.monotonic() - t0
                t_comp = bench(c)
        gbs = nbytes / t_ours / 1e6
        out.add({"kernel": label, "ms": t_ours, "eager_ms": t_eager, "compile_ms": t_comp,
                 "speedup_vs_eager": t_eager / t_ours, "speedup_vs_compile": t_comp / t_ours,
                 "GBps": gbs, "fraction_of_copy": gbs / copy_gbs})

    nb = x.numel() * 2
    row("rmsnorm_fwd", lambda: norm.RMSNormFunction.apply(x, w, 1e-6),
        lambda: norm.rms_norm_reference(x, w, 1e-6), 2 * nb)
    xr = x.clone().requires_grad_()
    wr_ = w.clone().requires_grad_()
    row("rmsnorm_fwd+bwd", lambda: torch.autograd.grad(K.rms_norm(xr, wr_, 1e-6), (xr, wr_), dy),
        lambda: torch.autograd.grad(norm.rms_norm_reference(xr, wr_, 1e-6), (xr, wr_), dy), 5 * nb)
    a, b = x, torch.randn_like(x)
    row("swiglu_fwd", lambda: K.swiglu(a, b), lambda: F.silu(a) * b, 3 * nb)
    B, NH, S, D = 4, 32, R // 4, 128
    q = torch.randn(B, S, NH, D, device=dev).bfloat16().transpose(1, 2)
    cos, sin = K.rope_cos_sin(torch.arange(S, device=dev), D, 10000.0, torch.bfloat16, dev)
    row("rope_q", lambda: rope._rope_launch(q, cos, sin, False), lambda: rope.rope_reference(q, cos, sin),
        2 * q.numel() * 2)
    V = 32768
    logits = torch.randn(4096, V, device=dev).bfloat16()
    labels = torch.randint(0, V, (4096,), device=dev)
    scale = torch.tensor(1.0 / 4096, device=dev)
    row("ce_rows_bf16", lambda: cross_entropy._rows(logits, labels, -100, scale),
        lambda: cross_entropy._rows_reference(logits, labels, -100, scale), 2 * logits.numel() * 2)
    hid = torch.randn(4096, H, device=dev).bfloat16().requires_grad_()
    head = (torch.randn(V, H, device=dev) * 0.02).bfloat16().requires_grad_()

    def ce_ref():
        return torch.autograd.grad(F.cross_entropy((hid @ head.t()).float(), labels), (hid, head))

    row("fused_linear_ce_fwdbwd", lambda: torch.autograd.grad(K.fused_linear_cross_entropy(hid, head, labels), (hid, head)),
        ce_ref, 2 * (hid.numel() + head.numel()) * 2)
    del hid, head
    g = torch.randn(1 << 26, device=dev).bfloat16()
    row("grad_sq_norm_bf16", lambda: K.grad_sq_norm(g), lambda: g.float().pow(2).sum(), g.numel() * 2)
    acc = torch.zeros(1 << 26, device=dev)
    row("acc_bf16_to_f32", lambda: K.accumulate_grad_(acc, g, 1.0), lambda: acc.add_(g.float()),
        g.numel() * 2 + acc.numel() * 8)

    return 0


if __name__ == "__main__":
    sys.exit(main())
