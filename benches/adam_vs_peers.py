"""CPU AdamW against its peers, measured in one run, interleaved (one step of each method per
round, so machine noise hits all of them alike), at 10M and 100M parameters:

- horizon CPUAdamW (the torch.optim.Optimizer; its state in Horizon's arena), and the fused
  step with the bf16 copy on a LayerSlab (what the engine runs);
- torch.optim.AdamW with fused=True and with foreach=True;
- DeepSpeedCPUAdam when deepspeed is installed (its CPU Adam JIT-builds on first use), alone
  and followed by the bf16 copy a trainer needs (`w.copy_(p)`, torch's RNE conversion);
- the memory-bandwidth roof: a Rust pass with Adam's exact loads and stores and no arithmetic,
  on torch-allocated buffers and on the slab. It is benchmark-only code behind the cargo
  feature `roof`, not in the shipped module; build the module with it for these rows:

      maturin develop --release --features python,pyo3/extension-module,roof

  Without it the roof rows are skipped, with a line saying so.

Every optimizer keeps its own state, as each is used for real (about 5 GB at 100M).
Prints the median and the best time per step, parameters/s and effective GB/s of the median
(28 bytes/param moved, 30 with the bf16 copy), and the ratios the closing note asks for (of
medians; of best times in brackets, the figure less affected by other load on the machine).

    python benches/adam_vs_peers.py [--sizes 10e6,100e6] [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from horizon import _native
from horizon.optim import CPUAdamW, adam_config, fused_adamw_
from horizon.store import LayerSlab

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 1e-2
HYPER = _native.AdamW(LR, *BETAS, EPS, WD)
# The roof kernel exists only in a module built with the cargo feature `roof`.
HAS_ROOF = hasattr(_native, "adam_memory_roof_raw")
ROOF_SKIPPED = ("roof rows skipped: this horizon._native was built without the cargo feature `roof`; rebuild "
                "with `maturin develop --release --features python,pyo3/extension-module,roof` to measure them")
BYTES = 28  # read p, g, m, v (16) + write p, m, v (12)
BYTES_BF16 = 30  # + the bf16 copy (2)


def try_deepspeed():
    """(DeepSpeedCPUAdam, None), or (None, why not): deepspeed missing, or its CPU Adam op not
    building (it JIT-builds on first use and needs ninja and a C++ compiler on PATH): the
    optimizer is made once on a small parameter here, so a failed build skips its rows."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(16))], lr=LR, adamw_mode=True)
        return DeepSpeedCPUAdam, None
    except Exception as e:  # ImportError, or the JIT build failing
        why = f"{type(e).__name__}: {e}"
        cause = e.__cause__
        if cause is not None:
            why += f" ({type(cause).__name__}: {cause})"
        return None, " ".join(why.split())[:300]


def build_methods(n: int, ds_cls):
    """One step of each method, as each is used for real: every optimizer allocates its own
    state (torch and DeepSpeed with torch's allocator, CPUAdamW in Horizon's arena), on the
    same fp32 parameter and gradient; the fused step with the bf16 copy runs on a LayerSlab
    (the engine's layout) with the same gradient."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(n, generator=g)
    grad = torch.randn(n, generator=g) * 0.1
    param = torch.nn.Parameter(p)  # shares p's storage
    param.grad = grad
    methods = {}

    ours = CPUAdamW([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    methods["horizon CPUAdamW"] = (ours.step, BYTES)

    slab = LayerSlab(n)
    slab.master.copy_(p)
    counter = {"step": 0}

    def slab_step():
        counter["step"] += 1
        fused_adamw_(slab.master, grad, slab.exp_avg, slab.exp_avg_sq, hyper=HYPER, step=counter["step"],
                     bf16_out=slab.weights_bf16)

    methods["horizon fused step + bf16 (slab)"] = (slab_step, BYTES_BF16)

    torch_state = None
    for name, kw in (("torch AdamW fused", {"fused": True}), ("torch AdamW foreach", {"foreach": True})):
        try:
            opt = torch.optim.AdamW([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kw)
            if torch_state is not None:
                opt.state[param] = torch_state  # same allocator and layout: share to save memory
            opt.step()  # fails here if this build has no CPU kernel for the variant
            torch_state = opt.state[param]
            methods[name] = (opt.step, BYTES)
        except Exception as e:
            print(f"  {name}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")

    if ds_cls is not None:
        ds = ds_cls([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, adamw_mode=True)
        methods["DeepSpeedCPUAdam"] = (ds.step, BYTES)
        w = torch.empty(n, dtype=torch.bfloat16)

        def ds_then_copy():
            ds.step()
            w.copy_(p)  # round to nearest even, into a preallocated buffer

        methods["DeepSpeedCPUAdam + bf16 copy"] = (ds_then_copy, BYTES_BF16)

    def roof(pp, mm, vv, out):
        wp = 0 if out is None else out.data_ptr()

        def run():
            _native.adam_memory_roof_raw(pp.data_ptr(), grad.data_ptr(), mm.data_ptr(), vv.data_ptr(), wp, n)

        return run

    if not HAS_ROOF:
        return methods
    # The roof XORs p, m, v with g; a second (untimed) pass restores them exactly.
    if torch_state is not None:
        r = roof(p, torch_state["exp_avg"], torch_state["exp_avg_sq"], None)
        methods["roof (torch-allocated buffers)"] = (r, BYTES, r)
    r = roof(slab.master, slab.exp_avg, slab.exp_avg_sq, slab.weights_bf16)
    methods["roof + bf16 (slab)"] = (r, BYTES_BF16, r)
    return methods


def measure(methods, rounds: int):
    """Median and best seconds per step of each method over `rounds` interleaved rounds."""
    times = {k: [] for k in methods}
    for entry in methods.values():  # warm-up: page faults, JIT, thread pools
        entry[0]()
        if len(entry) > 2:
            entry[2]()
    for _ in range(rounds):
        for name, entry in methods.items():
            t0 = time.perf_counter()
            entry[0]()
            times[name].append(time.perf_counter() - t0)
            if len(entry) > 2:
                entry[2]()
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10e6,100e6", help="comma-separated parameter counts")
    ap.add_argument("--rounds", type=int, default=9, help="rounds at 100M; smaller sizes get proportionally more (<= 60)")
    args = ap.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]

    cfg = adam_config()
    print(f"horizon: simd={cfg['simd']} threads={cfg['threads']}; torch {torch.__version__} threads={torch.get_num_threads()}")
    ds_cls, ds_why = try_deepspeed()
    print("DeepSpeedCPUAdam: " + ("available" if ds_cls else f"not available ({ds_why}); its rows are skipped"))
    if not HAS_ROOF:
        print(ROOF_SKIPPED)

    for n in sizes:
        rounds = max(args.rounds, min(60, int(args.rounds * 1e8 / max(n, 1))))
        print(f"\n== {n / 1e6:g}M parameters, {rounds} interleaved rounds ==")
        methods = build_methods(n, ds_cls)
        res = measure(methods, rounds)
        print(f"{'method':36s} {'median ms':>10s} {'best ms':>8s} {'Mparam/s':>9s} {'GB/s':>6s}")
        for name, (t, best) in res.items():
            nbytes = methods[name][1]
            print(f"{name:36s} {t * 1e3:10.2f} {best * 1e3:8.2f} {n / t / 1e6:9.1f} {n * nbytes / t / 1e9:6.2f}")

        def ratio(label, a, b, target=None):
            if a in res and b in res:
                r, rb = res[b][0] / res[a][0], res[b][1] / res[a][1]
                goal = f"  (target >= {target:g}x)" if target else ""
                print(f"  {label:56s} {r:5.2f}x [{rb:5.2f}x]{goal}")

        print("ratios (speed of the first over the second):")
        ours, fused, roof, roof_bf16 = (
            "horizon CPUAdamW", "horizon fused step + bf16 (slab)", "roof (torch-allocated buffers)", "roof + bf16 (slab)")
        ratio("CPUAdamW vs DeepSpeedCPUAdam", ours, "DeepSpeedCPUAdam", 1.0)
        ratio("CPUAdamW vs torch AdamW fused", ours, "torch AdamW fused", 1.05)
        ratio("CPUAdamW vs torch AdamW foreach", ours, "torch AdamW foreach")
        ratio("fused step + bf16 vs DeepSpeedCPUAdam + bf16 copy", fused, "DeepSpeedCPUAdam + bf16 copy", 1.3)
        ratio("fused step + bf16 vs torch fused (no copy)", fused, "torch AdamW fused")
        ratio("CPUAdamW vs the roof (>1: its arena state beats torch's)", ours, roof, 0.9)
        ratio("fused step + bf16 vs the roof + bf16, same slab", fused, roof_bf16, 0.9)
        del methods


if __name__ == "__main__":
    main()
