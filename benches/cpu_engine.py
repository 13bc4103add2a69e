"""The engine on the CPU device against plain torch training of the same model, in one run:
horizon.Trainer (fp32, host store, layer-major schedule, Rust AdamW overlapped) versus HF
transformers LlamaForCausalLM + torch.optim.AdamW(fused=True), same config, batch and
micro-batching, interleaved step by step so machine noise hits both alike. Reports tokens/s of
each, the ratio, and Horizon's peak host bytes against the model's footprint formula.

    python benches/cpu_engine.py [--layers 4] [--hidden 256] [--rows 8] [--seq 128] [--steps 6]
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
        "tie_word_embeddings": False, "initializer_range": 0.02,
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

    import transformers

    import horizon

    cfg = config(args.layers, args.hidden)
    hz = horizon.Trainer.from_config(cfg, device="cpu", lr=1e-4, micro_batch_size=args.micro_batch)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    model = transformers.LlamaForCausalLM(hf_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def torch_step(ids):
        for chunk in ids.split(args.micro_batch):
            (model(input_ids=chunk, labels=chunk).loss * (chunk.shape[0] / ids.shape[0])).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (args.rows, args.seq), generator=g)
    hz.train_step(ids)  # warm-up: first-touch of the slabs, allocator, kernels
    torch_step(ids)
    t_hz, t_pt = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        hz.train_step(ids)
        hz.synchronize()
        t_hz.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch_step(ids)
        t_pt.append(time.perf_counter() - t0)
    tokens = args.rows * args.seq
    n = hz.num_parameters
    m_hz, m_pt = statistics.median(t_hz), statistics.median(t_pt)
    print(f"model: Llama {args.layers} layers x {args.hidden}, {n / 1e6:.2f} M parameters; "
          f"batch {args.rows} x {args.seq}, micro-batch {args.micro_batch}; torch threads {torch.get_num_threads()}")
    print(f"horizon.Trainer (cpu, fp32)        {m_hz * 1e3:8.1f} ms/step  {tokens / m_hz:9.0f} tok/s")
    print(f"transformers + torch AdamW(fused)  {m_pt * 1e3:8.1f} ms/step  {tokens / m_pt:9.0f} tok/s")
    print(f"ratio (horizon / torch tokens/s)   {m_pt / m_hz:.2f}x")
    st = hz.stats
    print(f"horizon peak host bytes {st['peak_host_bytes'] / 2**20:.1f} MiB = {st['peak_host_bytes'] / n:.1f} B/param "
          f"(14 B/param for the state + slots, checkpoints and activations on the CPU device); "
          f"exposed optimizer {st['exposed_optimizer_seconds'] / (args.steps + 1) * 1e3:.1f} ms/step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
