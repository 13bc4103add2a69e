"""GPU benchmark of flash_moe (issue 6), forward and forward+backward, at Mixtral-8x7B and
Qwen3-30B-A3B layer shapes with 4K and 16K tokens: the fused kernel against a per-expert
torch loop (horizon.moe.flash_moe_reference) and a torch grouped-GEMM implementation
(sort-based dispatch + torch._grouped_mm: the fused path's torch twin), as ratios in one run,
and achieved TFLOPS against a bf16 matmul measured in the same run.
Usage: python benches/gpu_moe.py --out FILE.json [--quick]. Without a GPU: a message, exit 0."""

from __future__ import annotations

import argparse
import json
import sys

SHAPES = {
    "mixtral-8x7b": dict(H=4096, I=14336, E=8, k=2),
    "qwen3-30b-a3b": dict(H=2048, I=768, E=128, k=8),
}


def bench(fn, iters=10, warmup=3):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="4K tokens only")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_moe: no CUDA GPU on this machine; nothing measured")
        return 0
    from horizon import moe
    from horizon.kernels import moe_fused

    dev = torch.device("cuda")
    results = {"device": torch.cuda.get_device_name(dev), "runs": []}
    a = torch.randn(8192, 8192, device=dev).bfloat16()
    ms = bench(lambda: a @ a, iters=20)
    peak = 2 * 8192**3 / ms / 1e9
    results["matmul_TFLOPS"] = peak
    print(f"bf16 matmul: {peak:.0f} TFLOPS")
    del a
    for shape, s in SHAPES.items():
        H, I, E, k = s["H"], s["I"], s["E"], s["k"]
        w = [(torch.randn(*sh, device=dev) * 0.02).bfloat16() for sh in ((E, H), (E, I, H), (E, I, H), (E, H, I))]
        for T in ([4096] if args.quick else [4096, 16384]):
            x = torch.randn(T, H, device=dev).bfloat16()
            flops = 2 * T * E * H + T * k * 6 * H * I
            impls = {
                "fused": lambda xx, ww: moe.flash_moe(xx, ww[0], ww[1], ww[2], ww[3], top_k=k),
                "torch_grouped": lambda xx, ww: moe_fused.flash_moe_fused(xx, ww[0], ww[1], ww[2], ww[3], top_k=k,
                                                                          use_kernel=False),
                "torch_loop": lambda xx, ww: moe.flash_moe_reference(xx, ww[0], ww[1], ww[2], ww[3], top_k=k),
            }
            row = {"shape": shape, "tokens": T}
            for name, fn in impls.items():
                try:
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
            f = row.get("fused_fwd_ms")
            best = min(
                (v for kk, v in row.items() if kk.endswith("_fwd_ms") and not kk.startswith("fused")),
                default=float("nan"),
            )
            bestfb = min(
                (v for kk, v in row.items() if kk.endswith("_fwdbwd_ms") and not kk.startswith("fused")),
                default=float("nan"),
            )
            if f:
                row["fwd_TFLOPS"] = flops / f / 1e9
                row["fwd_fraction_of_matmul"] = row["fwd_TFLOPS"] / peak
                row["fwd_speedup_vs_best_torch"] = best / f
            if row.get("fused_fwdbwd_ms"):
                row["fwdbwd_speedup_vs_best_torch"] = bestfb / row["fused_fwdbwd_ms"]
            results["runs"].append(row)
            print(json.dumps(row))
            del x
        del w
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
