"""The engine on the CPU device against plain torch training of the same model, in one run:
horizon.Trainer (fp32, host store, layer-major schedule, Rust AdamW overlapped) with the
activation budget covering every block ("keep": each block's forward runs once) and with none
("recompute": the forward runs again in the backward), versus HF transformers LlamaForCausalLM +
torch.optim.AdamW(fused=True), same config, batch and micro-batching, interleaved step by step
so machine noise hits all alike. Per size: tokens/s of each, the ratios to torch, and Horizon's
peak host bytes.

    python benches/cpu_engine.py                      # the three sizes below
    python benches/cpu_engine.py --sizes 8x512x8x256  # layers x hidden x rows x seq
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# layers x hidden x rows x seq: 6.6M, 25.6M and 51M parameters
SIZES = ["4x256x8x128", "8x512x8x256", "4x1024x4x256"]


def config(layers, hidden, vocab=512):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": hidden * 8 // 3 // 16 * 16, "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64), "num_key_value_heads": max(1, hidden // 64),
        "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "initializer_range": 0.02,
    }


def bench(layers, hidden, rows, seq, micro_batch, steps, verbose=False) -> dict:
    import transformers

    import horizon

    cfg = config(layers, hidden)
    runs = {name: horizon.Trainer.from_config(cfg, device="cpu", lr=1e-4, micro_batch_size=micro_batch,
                                              activation_memory=budget)
            for name, budget in (("keep", 1 << 40), ("recompute", 0))}
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    model = transformers.LlamaForCausalLM(hf_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def torch_step(ids):
        for chunk in ids.split(micro_batch):
            (model(input_ids=chunk, labels=chunk).loss * (chunk.shape[0] / ids.shape[0])).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def horizon_step(trainer):
        def run(ids):
            trainer.train_step(ids)
            trainer.synchronize()
        return run

    steppers = {"torch": torch_step, **{name: horizon_step(t) for name, t in runs.items()}}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (rows, seq), generator=g)
    for fn in steppers.values():  # warm-up: first-touch of the slabs, allocator, kernels
        fn(ids)
    times = {name: [] for name in steppers}
    for _ in range(steps):
        for name, fn in steppers.items():
            t0 = time.perf_counter()
            fn(ids)
            times[name].append(time.perf_counter() - t0)
    tokens = rows * seq
    med = {name: statistics.median(t) for name, t in times.items()}
    if verbose:
        for name, t in times.items():
            print(f"  {name} step times (s): " + " ".join(f"{x:.3f}" for x in t))
    n = runs["keep"].num_parameters
    print(f"model: Llama {layers} layers x {hidden}, {n / 1e6:.2f} M parameters; batch {rows} x {seq}, "
          f"micro-batch {micro_batch}; torch threads {torch.get_num_threads()}; median of {steps} interleaved steps")
    for name, label in (("keep", "horizon, every block kept"), ("recompute", "horizon, every block recomputed"),
                        ("torch", "transformers + torch AdamW(fused)")):
        ratio = "" if name == "torch" else f"  {med['torch'] / med[name]:.2f}x torch"
        print(f"  {label:<34}{med[name] * 1e3:9.1f} ms/step {tokens / med[name]:9.0f} tok/s{ratio}")
    for name, t in runs.items():
        st = t.stats
        print(f"  {name}: peak host {st['peak_host_bytes'] / n:.1f} B/param, device (host RAM) "
              f"{st['peak_device_bytes'] / 2**20:.1f} MiB (kept activations {st['activation_kept_bytes'] / 2**20:.1f}"
              f" MiB), {st['flops_per_step'] / 1e9:.2f} GFLOP/step")
    return {name: med["torch"] / med[name] for name in runs}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=SIZES, help="layers x hidden x rows x seq")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--verbose", action="store_true", help="print every step's time")
    args = ap.parse_args()
    ratios = []
    for size in args.sizes:
        layers, hidden, rows, seq = (int(v) for v in size.split("x"))
        ratios.append((size, bench(layers, hidden, rows, seq, min(args.micro_batch, rows), args.steps, args.verbose)))
    print("tokens/s ratio to transformers + torch AdamW: "
          + "; ".join(f"{size}: keep {r['keep']:.2f}x, recompute {r['recompute']:.2f}x" for size, r in ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
