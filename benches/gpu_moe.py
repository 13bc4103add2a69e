"""GPU benchmark of flash_moe (issue 6), forward and forward+backward, at Mixtral-8x7B and
Qwen3-30B-A3B layer shapes with 4K and 16K tokens, on random and on skewed routing: the fused
kernels (forward + backward kernel) against the fused forward with the grouped-GEMM backward,
a per-expert torch loop (horizon.moe.flash_moe_reference) and a torch grouped-GEMM
implementation (sort-based dispatch + torch._grouped_mm: the fused path's torch twin), as
ratios in one run; the backward alone (kernel vs grouped GEMMs from one forward state); and
achieved TFLOPS against a bf16 matmul measured in the same run.
Usage: python benches/gpu_moe.py --out FILE.jsonl [--quick]. Each run's row is appended to the
JSON Lines file as soon as it is measured. Without a GPU: a message, exit 0."""

from __future__ import annotations

import argparse
import sys

from cuda_timing import median_ms
from gpu_rows import Rows

SHAPES = {
    "mixtral-8x7b": dict(H=4096, I=14336, E=8, k=2),
    "qwen3-30b-a3b": dict(H=2048, I=768, E=128, k=8),
}


def bench(fn, iters=10, warmup=3):
    return median_ms(fn, iters=iters, warmup=warmup)


def flops_of(T, H, I, E, k):
    """(forward, backward) FLOPs as the kernels do them, P = T k pairs (all kept). Forward:
    router 2TEH, up (gate and up) 4PHI, down 2PHI. Backward kernel: per pair dh = dy w2 (2HI),
    g and u recomputed (4HI), dW2 (2HI), dx_pair (4HI), dW1 and dW3 (4HI): 16PHI; router dWr
    and dl Wr: 4TEH. Not 2x the forward (the recompute of g and u is 4PHI more)."""
    P = T * k
    return 2 * T * E * H + 6 * P * H * I, 16 * P * H * I + 4 * T * E * H


def run_shape(torch, moe, moe_fused, shape, routing, T, H, I, E, k, x, w, peak):
    flops, bwd_flops = flops_of(T, H, I, E, k)
    impls = {
        "fused": lambda xx, ww: moe.flash_moe(xx, ww[0], ww[1], ww[2], ww[3], top_k=k),
        "fused_torchbwd": lambda xx, ww: moe_fused.flash_moe_fused(xx, ww[0], ww[1], ww[2], ww[3], top_k=k,
                                                                   backward="torch"),
        "torch_grouped": lambda xx, ww: moe_fused.flash_moe_fused(xx, ww[0], ww[1], ww[2], ww[3], top_k=k,
                                                                  use_kernel=False, backward="torch"),
        "torch_loop": lambda xx, ww: moe.flash_moe_reference(xx, ww[0], ww[1], ww[2], ww[3], top_k=k),
    }
    row = {"shape": shape, "tokens": T, "routing": routing}
    for name, fn in impls.items():
        try:
            if name != "fused_torchbwd":  # same forward as "fused"
                with torch.no_grad():
                    row[f"{name}_fwd_ms"] = bench(lambda: fn(x, w))
            xg = x.clone().requires_grad_()
            wg = [t.clone().requires_grad_() for t in w]
            dy = torch.randn_like(x)

            def fb():
                y, _ = fn(xg, wg)
                torch.autograd.grad(y, [xg, *wg], dy)

            row[f"{name}_fwdbwd_ms"] = bench(fb, iters=5, warmup=2)
            del xg, wg
        except Exception as e:  # one failing implementation must not hide the others
            row[f"{name}_error"] = repr(e)[:300]
    # The backward alone, both from one forward state.
    try:
        if moe_fused.can_run(x, *w, top_k=k, activation="swiglu"):
            st = moe_fused.forward_kernel(x, *w, k, True, None)
            dy = torch.randn_like(x)
            dl = torch.zeros(T, E, device=x.device)
            row["kernel_bwd_ms"] = bench(lambda: moe_fused.backward_kernel(st, dy, dl, x, *w, k, True), iters=5)
            row["grouped_bwd_ms"] = bench(lambda: moe_fused.backward_torch(st, dy, dl, x, *w, k, True), iters=5)
            row["bwd_speedup_kernel_vs_grouped"] = row["grouped_bwd_ms"] / row["kernel_bwd_ms"]
            row["bwd_TFLOPS"] = bwd_flops / row["kernel_bwd_ms"] / 1e9
            row["bwd_fraction_of_matmul"] = row["bwd_TFLOPS"] / peak
            del st
    except Exception as e:
        row["bwd_error"] = repr(e)[:300]
    f = row.get("fused_fwd_ms")
    best = min((v for kk, v in row.items() if kk.endswith("_fwd_ms") and not kk.startswith("fused")),
               default=float("nan"))
    bestfb = min((v for kk, v in row.items() if kk.endswith("_fwdbwd_ms") and not kk.startswith("fused")),
                 default=float("nan"))
    if f:
        row["fwd_TFLOPS"] = flops / f / 1e9
        row["fwd_fraction_of_matmul"] = row["fwd_TFLOPS"] / peak
        row["fwd_speedup_vs_best_torch"] = best / f
    if row.get("fused_fwdbwd_ms"):
        row["fwdbwd_speedup_vs_best_torch"] = bestfb / row["fused_fwdbwd_ms"]
        if row.get("fused_torchbwd_fwdbwd_ms"):
            row["fwdbwd_speedup_vs_fused_torchbwd"] = row["fused_torchbwd_fwdbwd_ms"] / row["fused_fwdbwd_ms"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="4K tokens only")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_moe: no CUDA GPU on this machine; nothing measured")
        return 0
    from horizon.kernels.moe import reference as moe
    from horizon.kernels.moe import fused as moe_fused

    dev = torch.device("cuda")
    out = Rows(args.out, "gpu_moe")
    a = torch.randn(8192, 8192, device=dev).bfloat16()
    ms = bench(lambda: a @ a, iters=20)
    peak = 2 * 8192**3 / ms / 1e9
    out.add({"device": torch.cuda.get_device_name(dev), "matmul_TFLOPS": peak})
    del a
    for shape, s in SHAPES.items():
        H, I, E, k = s["H"], s["I"], s["E"], s["k"]
        w = [(torch.randn(*sh, device=dev) * 0.02).bfloat16() for sh in ((E, H), (E, I, H), (E, I, H), (E, H, I))]
        for T in ([4096] if args.quick else [4096, 16384]):
            for routing in ("random", "skewed"):
                x = torch.randn(T, H, device=dev)
                wts = list(w)
                if routing == "skewed":
                    # A direction shared by every token lifts expert 0's logit by 2 (router
                    # logits have a std of about 1 here): one hot expert, a long tail.
                    d = torch.randint(0, 2, (H,), device=dev).float() * 2 - 1
                    x = x + 0.25 * d
                    wts[0] = w[0].clone()
                    wts[0][0] += (d * (2.0 / (0.25 * H))).bfloat16()
                x = x.bfloat16()
                out.add(run_shape(torch, moe, moe_fused, shape, routing, T, H, I, E, k, x, wts, peak))
                del x
        del w
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
