"""The card's ceilings, measured in the same call as every other GPU benchmark: device-to-device
copy bandwidth, bf16 matmul TFLOP/s, and host<->device bandwidth from memory that our Rust arena
page-locked (horizon.store.host_buffer) versus pageable torch memory.

    python benches/gpu_ceilings.py --out ceilings.jsonl
Each figure is appended to the JSON Lines file as it is measured. Without a GPU it says so
and exits 0.
"""

from __future__ import annotations

import argparse
import sys

import torch

from cuda_timing import median_ms
from gpu_rows import Rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_ceilings: no CUDA GPU here; nothing measured")
        return 0
    dev = torch.device("cuda")
    rows = Rows(args.out, "gpu_ceilings")
    res = {"card": torch.cuda.get_device_name(dev)}
    rows.add({"card": res["card"]})

    n = 1 << 28  # 1 GiB of fp32 per buffer: well past L2
    src = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    res["d2d_copy_GBps"] = 2 * n * 4 / ms / 1e6  # bytes read + written
    rows.add({"d2d_copy_GBps": res["d2d_copy_GBps"]})
    del src, dst

    m = k = nn = 8192
    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    b = torch.randn(k, nn, device=dev, dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b)
    res["bf16_matmul_TFLOPs"] = 2 * m * k * nn / ms / 1e9
    rows.add({"bf16_matmul_TFLOPs": res["bf16_matmul_TFLOPs"]})
    del a, b

    from horizon.store import host_buffer

    nbytes = 1 << 30
    gpu = torch.empty(nbytes // 4, dtype=torch.float32, device=dev)
    pinned = host_buffer(nbytes // 4, torch.float32)
    pinned.fill_(1.0)
    pageable = torch.ones(nbytes // 4, dtype=torch.float32)
    for name, host in (("arena_pinned", pinned), ("pageable", pageable)):
        ms = median_ms(lambda: gpu.copy_(host, non_blocking=True), iters=10)
        res[f"h2d_{name}_GBps"] = nbytes / ms / 1e6
        ms = median_ms(lambda: host.copy_(gpu, non_blocking=True), iters=10)
        res[f"d2h_{name}_GBps"] = nbytes / ms / 1e6
        rows.add({f"h2d_{name}_GBps": res[f"h2d_{name}_GBps"], f"d2h_{name}_GBps": res[f"d2h_{name}_GBps"]})
    res["h2d_pinned_over_pageable"] = res["h2d_arena_pinned_GBps"] / res["h2d_pageable_GBps"]
    rows.add({"h2d_pinned_over_pageable": res["h2d_pinned_over_pageable"]})

    for k_, v in res.items():
        print(f"{k_:28s} {v:.1f}" if isinstance(v, float) else f"{k_:28s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
