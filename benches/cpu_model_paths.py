"""The two model paths on the CPU device, in one run: the same Llama model (same weights, same
batches) trained by horizon.Trainer with model_path="native" (Horizon's own templates and
kernels) and with model_path="hf" (transformers' own modules bound to the streamed slots),
interleaved step by step so machine noise hits both alike. Reports tokens/s of each and the
ratio, and checks the two paths' losses agree.

    python benches/cpu_model_paths.py [--layers 4] [--hidden 256] [--rows 8] [--seq 128] [--steps 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def config(layers, hidden, vocab=512):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": hidden * 8 // 3 // 16 * 16, "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64), "num_key_value_heads": max(1, hidden // 64),
        "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "initializer_range": 0.02, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()

    import horizon

    cfg = config(args.layers, args.hidden)
    trainers = {}
    for path in ("native", "hf"):
        trainers[path] = horizon.Trainer.from_config(cfg, seed=0, device="cpu", lr=1e-4,
                                                     micro_batch_size=args.micro_batch, model_path=path)
    # The same starting weights on both paths (the native initialiser's), copied by HF name:
    # the two paths lay a layer's tensors out in different orders.
    src = trainers["native"].model.hf_views()
    with torch.no_grad():
        for name, dst in trainers["hf"].model.hf_views().items():
            dst.copy_(src[name])
    trainers["hf"].model.sync_bf16_()

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (args.rows, args.seq), generator=g)
    losses = {p: [t.train_step(ids)] for p, t in trainers.items()}  # warm-up: first touch, allocator
    times = {p: [] for p in trainers}
    for _ in range(args.steps):
        for path, t in trainers.items():
            t0 = time.perf_counter()
            losses[path].append(t.train_step(ids))
            t.synchronize()
            times[path].append(time.perf_counter() - t0)
    tokens = args.rows * args.seq
    med = {p: statistics.median(v) for p, v in times.items()}
    n = trainers["native"].num_parameters
    print(f"model: Llama {args.layers} layers x {args.hidden}, {n / 1e6:.2f} M parameters; "
          f"batch {args.rows} x {args.seq}, micro-batch {args.micro_batch}; torch threads {torch.get_num_threads()}")
    for path in trainers:
        print(f"model_path={path:7s} {med[path] * 1e3:8.1f} ms/step  {tokens / med[path]:9.0f} tok/s")
    print(f"ratio (hf / native tokens/s)   {med['native'] / med['hf']:.2f}x")
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["hf"], losses["native"]))
    print(f"losses agree within {worst:.1e} relative over {len(losses['hf'])} steps")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
