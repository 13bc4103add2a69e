"""Data-parallel gradient reduction: how much of it the backward hides (docs/distributed.md).

Two CPU ranks (Gloo over 127.0.0.1) train the same model two ways in the same run:
`overlapped` (the engine as shipped: each layer's all-reduce runs while the next layer's
backward computes, waited one layer later) and `serial` (the peer: every all-reduce waited
at once). Reported: median step seconds of each, their ratio, and the seconds per step the
step spent blocked on reductions (exposed communication).

    python benches/dp_overlap.py [--hidden 512] [--layers 4] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist


def _config(hidden: int, layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": 3 * hidden, "num_hidden_layers": layers, "num_attention_heads": 8,
        "num_key_value_heads": 4, "vocab_size": 4096, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "initializer_range": 0.02, "hidden_act": "silu",
    }


def _instrument(engine, serial: bool) -> None:
    """Times the waits on reductions; `serial` waits for each reduction as soon as it starts."""
    engine.bench_wait_s = 0.0
    land_reduced = engine._land_reduced

    def timed(layer, acc, work, norms, hp):
        t0 = time.perf_counter()
        work.wait()
        engine.bench_wait_s += time.perf_counter() - t0
        land_reduced(layer, acc, work, norms, hp)

    engine._land_reduced = timed
    if serial:
        land = engine._land

        def land_now(layer, acc, norms, **hp):
            land(layer, acc, norms, **hp)
            engine._flush_landings()
            return 0

        engine._land = land_now


def _worker(args) -> None:
    import horizon
    from horizon import distributed as hd

    torch.set_num_threads(1)
    rank, world = hd.init_from_env()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 4096, (args.rows, args.seq), generator=gen) for _ in range(args.steps)]
    out = {}
    for mode in ("overlapped", "serial", "overlapped"):  # the first pass also warms up
        t = horizon.Trainer.from_config(_config(args.hidden, args.layers), device="cpu", micro_batch_size=1)
        _instrument(t.engine, serial=(mode == "serial"))
        times, waits = [], []
        for ids in batches:
            dist.barrier()
            w0 = t.engine.bench_wait_s
            t0 = time.perf_counter()
            t.train_step(ids)
            t.engine.wait_all()
            times.append(time.perf_counter() - t0)
            waits.append(t.engine.bench_wait_s - w0)
        out[mode] = {"step_s": statistics.median(times[1:]), "wait_s": statistics.median(waits[1:]),
                     "params": t.num_parameters}
    if hd.is_rank0():
        print(json.dumps(out))
    hd.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    cmd = [sys.executable, __file__, "--worker"] + sys.argv[1:]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE)
             for r in range(2)]
    outs = [p.communicate()[0].decode() for p in procs]
    if any(p.returncode for p in procs):
        sys.exit("a rank failed")
    res = json.loads(outs[0].strip().splitlines()[-1])
    o, s = res["overlapped"], res["serial"]
    print(f"2 ranks, Gloo on CPU, {o['params'] / 1e6:.1f} M parameters, {args.rows} x {args.seq} tokens per step")
    for name, r in (("overlapped", o), ("serial (peer)", s)):
        print(f"  {name:14s} step {r['step_s']:.3f} s, blocked on reductions {r['wait_s']:.3f} s")
    print(f"  overlapped / serial step time: {o['step_s'] / s['step_s']:.2f}")


if __name__ == "__main__":
    main()
