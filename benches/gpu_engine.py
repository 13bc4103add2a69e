"""The RAM-centric engine on a GPU: tokens/s and TFLOP/s (6 x params x tokens basis) of
`horizon.Trainer` on the largest Llama the host RAM holds (capped by --max-params so the run
fits the benchmark's time budget), and, in the same run, Horizon against plain torch training
(HF LlamaForCausalLM, or the same templates as a plain torch module when transformers is not
installed; bf16 autocast, fp32 params, fused torch.optim.AdamW, all on the GPU) of a model that
fits GPU memory, as a ratio. The card's bf16 matmul ceiling is measured first so the
TFLOP/s can be read as a fraction of it.

    python benches/gpu_engine.py --out engine.jsonl [--quick]
Each figure is appended to the JSON Lines file as it is measured. --quick: Horizon alone on the
peer-sized model (the one engine figure of a re-run). Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_rows import Rows  # noqa: E402

BYTES_PER_PARAM = 18  # fp32 master + Adam m, v + bf16 copy + fp32 gradient buffer: docs/engine.md


def llama_config(layers, hidden=3072, heads=24, kv_heads=8, intermediate=8192, vocab=32000):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "tie_word_embeddings": False, "initializer_range": 0.02,
    }


def params_of(cfg):
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    block = h * (h + 2 * kv + h) + 3 * h * i + 2 * h
    return cfg["num_hidden_layers"] * block + 2 * v * h + h, block


def mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 << 30


def matmul_tflops(dev) -> float:
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * n**3 / (time.perf_counter() - t0) / 1e12


def batch(rows, seq, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, seq), generator=g)


def time_horizon(cfg, rows, seq, mbs, steps, activation_memory="auto"):
    import horizon

    t0 = time.perf_counter()
    trainer = horizon.Trainer.from_config(cfg, device="cuda", lr=1e-5, micro_batch_size=mbs,
                                          activation_memory=activation_memory)
    build_s = time.perf_counter() - t0
    trainer.train_step(batch(rows, seq, cfg["vocab_size"], 0))  # warm-up
    trainer.synchronize()
    torch.cuda.synchronize()
    s0 = dict(trainer.stats)
    t0 = time.perf_counter()
    losses = [trainer.train_step(batch(rows, seq, cfg["vocab_size"], 1 + k)) for k in range(steps)]
    trainer.synchronize()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    s1 = trainer.stats
    out = {
        "params": trainer.num_parameters, "build_s": build_s, "step_s": dt,
        "tokens_per_s": rows * seq / dt, "losses": losses,
        "h2d_GB_per_step": (s1["weight_bytes_h2d"] - s0["weight_bytes_h2d"]) / steps / 1e9,
        "d2h_GB_per_step": (s1["grad_bytes_d2h"] - s0["grad_bytes_d2h"]) / steps / 1e9,
        "exposed_optimizer_s_per_step": (s1["exposed_optimizer_seconds"] - s0["exposed_optimizer_seconds"]) / steps,
        "peak_device_GB": s1["peak_device_bytes"] / 1e9, "peak_host_GB": s1["peak_host_bytes"] / 1e9,
        "activation_blocks": sorted(set(s1["activation_blocks"].values())),
        "activation_kept_GB": s1["activation_kept_bytes"] / 1e9, "flops_per_step": s1["flops_per_step"],
    }
    out["tflops"] = 6 * out["params"] * out["tokens_per_s"] / 1e12
    del trainer
    torch.cuda.empty_cache()
    return out


class TemplateLlama(torch.nn.Module):
    """The peer when transformers is absent: the same layer templates, but as an ordinary
    GPU-resident torch model (one fp32 Parameter per layer, whole-model autograd)."""

    def __init__(self, cfg, dev):
        super().__init__()
        from horizon.models import ModelSpec, layer_defs
        from horizon.store import SlabLayout

        self.spec = ModelSpec.from_hf_config(cfg)
        self.defs = layer_defs(self.spec)
        self.layouts = [SlabLayout.from_shapes(d.shapes) for d in self.defs]
        self.flat = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(lay.numel, device=dev) * 0.02) for lay in self.layouts]
        )

    def forward(self, ids):
        from horizon import kernels
        from horizon.models import shift_labels

        views = [lay.views(p) for lay, p in zip(self.layouts, self.flat)]
        s = self.spec
        # Under autocast q and k come out of the projections in bf16: the tables must match.
        dtype = torch.bfloat16 if torch.is_autocast_enabled(ids.device.type) else torch.float32
        cos, sin = kernels.rope_cos_sin(torch.arange(ids.shape[1]), s.head_dim, s.rope_theta,
                                        dtype=dtype, device=ids.device)
        x = self.defs[0].template.forward(views[0], ids)
        for d, v in zip(self.defs[1:-1], views[1:-1]):
            x = d.template.forward(v, x, cos, sin)
        labels = shift_labels(ids)
        return self.defs[-1].template.loss_sum(views[-1], x, labels) / (labels != -100).sum()


def time_torch(cfg, rows, seq, mbs, steps):
    dev = torch.device("cuda")
    try:
        import transformers

        hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
        model = transformers.LlamaForCausalLM(hf_cfg).to(dev)
        peer = "transformers LlamaForCausalLM (sdpa)"

        def loss_of(chunk):
            return model(input_ids=chunk, labels=chunk).loss
    except ImportError:
        model = TemplateLlama(cfg, dev)
        peer = "torch model from horizon's templates"
        loss_of = model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step(ids):
        n = ids.shape[0]
        for chunk in ids.split(mbs):
            chunk = chunk.to(dev, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_of(chunk) * (chunk.shape[0] / n)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batch(rows, seq, cfg["vocab_size"], 0))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(steps):
        step(batch(rows, seq, cfg["vocab_size"], 1 + k))
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    params = sum(p.numel() for p in model.parameters())
    out = {"peer": peer, "params": params, "step_s": dt, "tokens_per_s": rows * seq / dt,
           "tflops": 6 * params * rows * seq / dt / 1e12,
           "peak_device_GB": torch.cuda.max_memory_allocated(dev) / 1e9}
    del model, opt
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--max-params", type=float, default=3.2e9, help="cap on the large model (time budget)")
    ap.add_argument("--host-fraction", type=float, default=0.6, help="share of MemAvailable the large model may use")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--peer-layers", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help="Horizon on the peer-sized model only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_engine: no CUDA GPU here; nothing measured")
        return 0

    dev = torch.device("cuda")
    out = Rows(args.out, "gpu_engine")
    res = {"card": torch.cuda.get_device_name(dev), "seq": args.seq, "rows": args.rows,
           "micro_batch": args.micro_batch, "tokens_per_step": args.rows * args.seq}
    res["bf16_matmul_tflops"] = matmul_tflops(dev)
    out.add(dict(res))

    def figure(name, r):
        out.add({"run": name, **{k: v for k, v in r.items() if k != "losses"}, "losses": r.get("losses")})
        print(f"{name:13s} params {r['params'] / 1e9:6.2f} B  {r['tokens_per_s']:10.0f} tok/s  "
              f"{r['tflops']:6.1f} TFLOP/s  step {r['step_s']:.2f} s  peak dev {r['peak_device_GB']:.1f} GB",
              flush=True)
        return r

    peer_cfg = llama_config(args.peer_layers)
    if args.quick:
        figure("peer_horizon", time_horizon(peer_cfg, args.rows, args.seq, args.micro_batch, args.steps))
        return 0
    # Peer comparison first (it needs the GPU memory to itself).
    torch_run = figure("peer_torch", time_torch(peer_cfg, args.rows, args.seq, args.micro_batch, args.steps))
    ours = figure("peer_horizon", time_horizon(peer_cfg, args.rows, args.seq, args.micro_batch, args.steps))
    ratio = ours["tokens_per_s"] / torch_run["tokens_per_s"]
    out.add({"horizon_vs_torch_tokens_per_s": ratio, "peer_params": torch_run["params"]})

    # The largest model the host holds, within the time cap.
    budget = min(args.host_fraction * mem_available() / BYTES_PER_PARAM, args.max_params)
    fixed, block = params_of(llama_config(0))
    layers = max(1, int((budget - fixed) // block))
    large = time_horizon(llama_config(layers), args.rows, args.seq, args.micro_batch, max(1, args.steps - 1))
    large["layers"] = layers
    large["fraction_of_matmul_ceiling"] = large["tflops"] / res["bf16_matmul_tflops"]
    figure("large", large)
    # The same model with no activation budget (every block recomputed): the budget's gain.
    again = time_horizon(llama_config(layers), args.rows, args.seq, args.micro_batch, max(1, args.steps - 1),
                         activation_memory=0)
    figure("large_recompute", again)
    gain = large["tokens_per_s"] / again["tokens_per_s"]
    out.add({"activation_budget_gain_tokens_per_s": gain, "large_params": large["params"],
             "large_blocks": large["activation_blocks"]})
    print(f"horizon / torch tokens/s on the {torch_run['params'] / 1e9:.2f} B model: {ratio:.2f}")
    print(f"activation budget auto / none tokens/s on the {large['params'] / 1e9:.2f} B model: {gain:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
