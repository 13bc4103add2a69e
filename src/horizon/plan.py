"""`horizon plan`: what a training run will need (host bytes by kind of state, device bytes, PCIe
bytes per step, a step-time lower bound) and whether it fits this machine. `horizon train` asks
the same question before it allocates anything.

The footprint follows docs/engine.md ("Footprint"): host 18 bytes per parameter (fp32 master 4,
Adam m and v 8, bf16 compute copy 2, the fp32 gradient buffer every step lands in 4), plus
gradient landing slots, any offloaded activation checkpoints, the process itself (interpreter,
torch and the libraries: `PROCESS_BASELINE_BYTES`, or this process's resident size when larger)
and the transient buffer of reading a model or checkpoint (one layer's fp32 state); device =
weight slots of the largest layer + its fp32 gradient accumulator + activation checkpoints + the
step's hidden states and their gradients + one block's live activations, at the compute dtype's
size (fp32 on the CPU, where the device is host memory too).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .data.config import DataConfig
from .engine.config import EngineConfig, check_micro_batch
from .engine.activations import offload_cheaper, step_flops
from .engine.ledger import host_memory
from .errors import HorizonError
from .models import layer_active_parameters, layer_defs, resolve

GIB = 1 << 30
WEIGHT_SLOTS = 2        # S: layers resident on the device at once (one computing, one loading)
LANDING_SLOTS = 2       # host fp32 buffers the device-to-host gradient stream lands in
LOSS_CHUNK_TOKENS = 1024  # tokens per chunk of the fused head + loss (fp32 logits and their grad)

# Achieved rates assumed for the step-time lower bound (not peaks): dense bf16 matmul throughput
# and pinned-memory copy bandwidth per direction, plus the host memory bandwidth the CPU AdamW
# pass streams at.
GPU_ASSUMPTIONS = [
    # (substring of the device name, TFLOP/s, H2D GB/s, D2H GB/s)
    ("H200", 650.0, 50.0, 50.0),   # PCIe Gen5 x16
    ("H100", 600.0, 50.0, 50.0),
    ("A100", 250.0, 24.0, 24.0),   # PCIe Gen4 x16
]
GENERIC_GPU = (100.0, 24.0, 24.0)
CPU_GFLOPS_PER_CORE = 30.0       # fp32 matmul, AVX2/AVX-512, what torch reaches on training shapes
HOST_MEMORY_GBPS = 50.0          # for the optimizer pass: ~30 bytes per parameter read + written
ADAM_BYTES_PER_PARAM = 30
# The resident memory of a training process before its model: the interpreter, torch (with its
# CUDA libraries mapped), numpy, tokenizers, safetensors, matplotlib, the native module, and the
# code pages a step touches. Measured once, as the peak RSS of `horizon train --preset tiny
# --device cpu --steps 3` (whose own footprint is ~15 MiB): 780 MiB with torch 2.14 (CPU, Linux
# x86-64); rounded up. A process that is already large (a heavier torch build, CUDA initialised)
# counts its own size plus what a step adds to it (code pages, matplotlib: ~150 MiB measured).
PROCESS_BASELINE_BYTES = 800 << 20
PROCESS_GROWTH_BYTES = 192 << 20


def read_model(config, model_path: str = "auto"):
    """The model a plan is for: the same reader `horizon train` uses (`models.resolve` of a
    config.json dict, native or hf path), so both accept and refuse the same models with the
    same message. A spec already read passes through."""
    if not isinstance(config, dict):
        if hasattr(config, "config") and hasattr(config, "num_layers"):
            return config
        raise HorizonError("model config must be a JSON object")
    return resolve(config, model_path)


def layer_parameters(config) -> list[tuple[str, int]]:
    """Parameters per streamed layer, in order: embedding, each block, final norm + head;
    counted from the templates' own tensor tables (what the host store allocates)."""
    return [(d.key, sum(math.prod(shape) for shape in d.shapes.values())) for d in layer_defs(read_model(config))]


def count_parameters(config) -> int:
    return sum(n for _, n in layer_parameters(config))


def _block_saved_elements(s, tokens: int, seq_len: int, math_attention: bool) -> int:
    """Elements one block's forward saves for its backward over `tokens` tokens: the block
    input, two norm outputs, q/k/v (and q/k normed where the family norms them), attention
    output, attention-out and MLP-out residuals, gate/up/activation/product of the MLP (MoE:
    each of the k routed copies' input, gate/up/activation/product and weighted output, and the
    router's logits and choices); with `math_attention` (the CPU device) the attention's scores
    and probabilities (2 x heads x seq_len per token), else none (memory-efficient attention).
    tests/test_activation_budget.py holds it against the bytes the engine measures."""
    if not hasattr(s, "num_heads"):  # the hf path: transformers' modules, sizes not ours to read;
        return tokens * 16 * s.hidden_size  # a generous per-token allowance (16 hidden vectors)
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    if s.is_moe:
        mlp = s.num_experts_per_tok * (3 * s.hidden_size + 4 * s.moe_intermediate_size + 4) + 2 * s.num_experts
    else:
        mlp = 3 * s.intermediate_size
    qk_norm = (q + kv) if getattr(s, "qk_norm", False) else 0  # Qwen3's normed q and k
    attention = 2 * s.num_heads * seq_len if math_attention else 0
    return tokens * (5 * s.hidden_size + q + 2 * kv + q + qk_norm + mlp + attention)


def activation_plan(s, *, batch_size: int, seq_len: int, micro_batch: int, elem: int, budget: int,
                    active: dict, math_attention: bool, host_budget: int = 0, cheaper=None) -> dict:
    """Which (block, micro-batch) forwards keep their saved tensors within `budget` bytes (the
    engine's greedy rule, in forward order, on the estimated bytes per unit), which of the rest
    go to host memory (placement "offload", CUDA: within `host_budget` and where
    `cheaper(key, nbytes, tokens)` says the copies cost less than the recompute), and what that
    makes of a step: kept and offloaded bytes, bytes moved, the tokens whose block inputs are
    still checkpointed, the matmul FLOPs (`engine.activations.step_flops`)."""
    units = [min(micro_batch, batch_size - lo) * seq_len for lo in range(0, batch_size, micro_batch)]
    keys = list(active)[1:-1]
    per_token = _block_saved_elements(s, 1, seq_len, math_attention) * elem
    held = host_held = kept_units = checkpoint_tokens = 0
    per_block, recomputed = {}, {}
    for key in keys:
        placed = []
        for t in units:
            nbytes = t * per_token
            if held + nbytes <= budget:
                held += nbytes
                placed.append("keep")
            elif cheaper is not None and host_held + nbytes <= host_budget and cheaper(key, nbytes, t):
                host_held += nbytes
                placed.append("offload")
            else:
                recomputed[key] = recomputed.get(key, 0) + t
                checkpoint_tokens += t
                placed.append("recompute")
        kept_units += len(placed) - placed.count("recompute")
        per_block[key] = placed[0] if len(set(placed)) == 1 else "partial"
    counts = {v: sum(1 for x in per_block.values() if x == v) for v in ("keep", "offload", "partial", "recompute")}
    return {"budget_bytes": budget, "unit_bytes": units[0] * per_token, "kept_bytes": held,
            "offloaded_bytes": host_held, "units_kept": kept_units, "units": len(units) * len(keys),
            "blocks": counts, "per_block": per_block,
            "flops_per_step": step_flops(active, s.tie_word_embeddings, batch_size * seq_len, recomputed),
            "checkpoint_tokens": checkpoint_tokens}


@dataclass
class Machine:
    device: str            # "cuda" or "cpu"
    name: str
    host_bytes: int        # memory available to this process now (beyond what it holds)
    device_bytes: int      # GPU memory; 0 on the CPU (device bytes then come from host memory)
    cores: int
    process_bytes: int = 0  # this process's resident size now: in use, yet available to the run


def process_rss() -> int:
    """This process's resident set size in bytes (0 when unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def this_machine(device: str = "auto") -> Machine:
    """The machine a run on `device` (an EngineConfig device) would use, as it is now."""
    host = host_memory()[0]
    if device == "cpu":
        return Machine("cpu", "CPU", host, 0, _cores(), process_rss())
    import torch

    from .engine.config import resolve_device

    dev = resolve_device(device)
    if dev.type != "cuda":
        return Machine("cpu", "CPU", host, 0, _cores(), process_rss())
    free, total = torch.cuda.mem_get_info(dev.index)
    # After the CUDA context exists, so the resident size counts it.
    return Machine("cuda", torch.cuda.get_device_name(dev.index), host_memory()[0], int(free), _cores(),
                   process_rss())


def _rates(machine: Machine):
    if machine.device == "cpu":
        flops = CPU_GFLOPS_PER_CORE * 1e9 * machine.cores
        return flops, None, None, f"CPU fp32 {CPU_GFLOPS_PER_CORE:g} GFLOP/s x {machine.cores} cores"
    for key, tf, h2d, d2h in GPU_ASSUMPTIONS:
        if key in machine.name:
            return tf * 1e12, h2d * 1e9, d2h * 1e9, f"{key}: bf16 {tf:g} TFLOP/s, H2D {h2d:g} GB/s, D2H {d2h:g} GB/s"
    tf, h2d, d2h = GENERIC_GPU
    return tf * 1e12, h2d * 1e9, d2h * 1e9, f"unknown GPU: bf16 {tf:g} TFLOP/s, H2D {h2d:g} GB/s, D2H {d2h:g} GB/s"


def make_plan(config: dict, *, batch_size: int, seq_len: int, micro_batch_size: int | None = None,
              grad_clip: bool = False, machine: Machine | None = None, compute_dtype: str | None = None,
              model_path: str = "auto", offload_dir: str | None = None, activation_memory="auto") -> dict:
    """The footprint and step-time bound of training `config` at these sizes on `machine`
    (`compute_dtype`: "float32" or "bfloat16"; None: bf16 on a GPU, fp32 on the CPU;
    `model_path`: as `horizon train --model-path`; with `offload_dir`: with the disk tier there,
    see engine/offload.py; `activation_memory`: as `horizon train --activation-memory`)."""
    # The rules of the run's own options (data shape, micro-batch), checked the same way.
    DataConfig(seq_len=seq_len, batch_size=batch_size)
    EngineConfig(micro_batch_size=micro_batch_size)
    mb = check_micro_batch(micro_batch_size, batch_size)
    s = read_model(config, model_path)
    if seq_len > s.max_positions:
        raise HorizonError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {s.max_positions}")
    machine = machine or this_machine()
    layers = layer_parameters(s)
    n = sum(p for _, p in layers)
    largest = max(p for _, p in layers)
    tokens = batch_size * seq_len

    if compute_dtype is None:
        c = 2 if machine.device == "cuda" else 4
    elif compute_dtype in ("float32", "bfloat16"):
        c = 4 if compute_dtype == "float32" else 2
    else:
        raise HorizonError(f"compute_dtype must be float32 or bfloat16, got {compute_dtype!r}")
    host = {
        "process_baseline": max(PROCESS_BASELINE_BYTES, machine.process_bytes + PROCESS_GROWTH_BYTES),
        "master_fp32": 4 * n,
        "adam_moments_fp32": 8 * n,
        "compute_copy_bf16": 2 * n,
        # Every step's gradients land here, so a step updates every layer or none (engine.md).
        "grad_buffer_fp32": 4 * n,
        "landing_slots": LANDING_SLOTS * 4 * largest,
        "load_buffer_fp32": 4 * largest,  # one layer's state read from a model or checkpoint file
    }
    device = {
        # the CPU device computes on the host weights in place (engine/pipeline.py alias_host)
        "weight_slots": 0 if machine.device == "cpu" else WEIGHT_SLOTS * c * largest,
        # the engine's persistent fp32 gradient buffers: two alternating ones of the largest layer
        # and one for the embedding (engine/schedule.py `_grad_acc`)
        "grad_accumulator_fp32": 4 * (2 * largest + layers[0][1]),
        "activation_checkpoints": s.num_layers * tokens * s.hidden_size * c,
        "hidden_states": 2 * tokens * s.hidden_size * c,  # the layer's outputs and their gradients
        # a recompute + its backward
        "block_activations": 2 * _block_saved_elements(s, mb * seq_len, seq_len, machine.device == "cpu") * c,
        "loss_chunk": 2 * 4 * min(LOSS_CHUNK_TOKENS, mb * seq_len) * s.vocab_size,
    }
    offloaded = False
    if machine.device == "cuda" and sum(device.values()) > machine.device_bytes:
        # The checkpoints move to pinned host memory when they do not fit beside the rest.
        offloaded = True
        host["offloaded_checkpoints"] = device.pop("activation_checkpoints")
        device["activation_checkpoints"] = 0
    # The activation budget (engine/schedule.py `_activation_budget`): auto is what the device
    # has left after the rest (on the CPU device: host memory), less max(1 GiB, 10%), less room
    # for the backward's live activations (twice a kept unit).
    budget = EngineConfig(activation_memory=activation_memory).activation_budget()
    auto = budget is None
    active = layer_active_parameters(s)
    unit = _block_saved_elements(s, mb * seq_len, seq_len, machine.device == "cpu") * c
    if budget is None:
        if machine.device == "cuda":
            left = machine.device_bytes - sum(device.values())
            margin = max(GIB, machine.device_bytes // 10)
        else:
            left = machine.host_bytes + machine.process_bytes - sum(host.values()) - sum(device.values())
            margin = max(GIB, machine.host_bytes // 10)
        # room for the backward's live activations (two units) and, where units may be
        # offloaded (CUDA), the units of two blocks back on the device (one computing, one
        # arriving)
        n_mb = len(range(0, batch_size, mb))
        budget = max(0, left - margin - (2 + (2 * n_mb if machine.device == "cuda" else 0)) * unit)
    host_budget, cheaper = 0, None
    flops, h2d, d2h, assumed = _rates(machine)
    if machine.device == "cuda" and auto:
        # Placement "offload": what the host has left after the rest, less its margin; the
        # engine measures the rates once, the plan assumes them (GPU_ASSUMPTIONS).
        host_budget = max(0, machine.host_bytes + machine.process_bytes - sum(host.values())
                          - max(GIB, machine.host_bytes // 10))

        def cheaper(key, nbytes, t):
            return offload_cheaper(nbytes, active[key], t, h2d, flops)
    acts = activation_plan(s, batch_size=batch_size, seq_len=seq_len, micro_batch=mb, elem=c, budget=budget,
                           active=active, math_attention=machine.device == "cpu", host_budget=host_budget,
                           cheaper=cheaper)
    if acts["offloaded_bytes"]:
        host["offloaded_activations"] = acts["offloaded_bytes"]
    # Kept units hold their own inputs: only the recomputed ones' inputs are checkpoints.
    ckpt = acts["checkpoint_tokens"] * s.hidden_size * c
    if offloaded:
        host["offloaded_checkpoints"] = ckpt
    else:
        device["activation_checkpoints"] = ckpt
    device["kept_activations"] = acts["kept_bytes"]
    # to the host in the forward, back in the backward
    acts["bytes_moved"] = 2 * (ckpt if offloaded else 0) + 2 * acts["offloaded_bytes"]
    if acts["offloaded_bytes"]:  # two blocks' units back on the device (one computing, one arriving)
        device["offloaded_activations_in"] = 2 * len(range(0, batch_size, mb)) * acts["unit_bytes"]
    host_total = sum(host.values())
    device_total = sum(device.values())

    compute_s = acts["flops_per_step"] / flops
    bounds = {"compute_s": compute_s,
              "optimizer_s": ADAM_BYTES_PER_PARAM * n / (HOST_MEMORY_GBPS * 1e9)}
    if machine.device == "cuda":
        pcie = {"weights_h2d": 2 * 2 * n, "grads_d2h": 4 * n}
        bounds["h2d_s"] = pcie["weights_h2d"] / h2d
        bounds["d2h_s"] = pcie["grads_d2h"] / d2h
    else:
        pcie = {"weights_h2d": 0, "grads_d2h": 0}  # no bus: the "device" is host memory
    step_s = max(bounds.values())

    margin = max(GIB, machine.host_bytes // 20)
    usable = machine.host_bytes + machine.process_bytes - margin
    if machine.device == "cuda":
        fits_host = host_total <= usable
        fits_device = device_total <= machine.device_bytes
    else:
        fits_host = host_total + device_total <= usable
        fits_device = True
    plan = {
        "architecture": s.architecture,
        "parameters": n,
        "layers": s.num_layers,
        "largest_layer_parameters": largest,
        "batch_size": batch_size, "seq_len": seq_len, "micro_batch_size": mb,
        "tokens_per_step": tokens, "grad_clip": bool(grad_clip),
        "host_bytes": host_total, "host_breakdown": host,
        "device_bytes": device_total, "device_breakdown": device,
        "checkpoints_offloaded": offloaded,
        "activations": acts,
        "pcie_bytes_per_step": sum(pcie.values()), "pcie_breakdown": pcie,
        "step_time_lower_bound_s": step_s, "step_time_terms_s": bounds,
        "tokens_per_s_upper_bound": tokens / step_s if step_s > 0 else math.inf,
        "assumptions": f"{assumed}; host memory {HOST_MEMORY_GBPS:g} GB/s for AdamW "
                       f"({ADAM_BYTES_PER_PARAM} B/param); compute 6*N*T FLOPs (forward, backward) "
                       f"+ 2*N*T per recomputed block (N: active parameters)",
        "machine": {"device": machine.device, "name": machine.name, "host_available_bytes": machine.host_bytes,
                    "device_bytes": machine.device_bytes, "cores": machine.cores, "host_margin_bytes": margin,
                    "process_bytes": machine.process_bytes, "host_usable_bytes": max(0, usable)},
        "fits_host": fits_host, "fits_device": fits_device, "fits": fits_host and fits_device,
    }
    if offload_dir is not None:
        from .engine.offload import apply_disk_tier

        apply_disk_tier(plan, layers, offload_dir)
    return plan


def _b(x: int) -> str:
    for unit, div in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x} B"


def format_plan(p: dict) -> str:
    m = p["machine"]
    lines = [
        f"model: {p['architecture']}, {p['parameters'] / 1e6:,.1f} M parameters, {p['layers']} blocks",
        f"step: batch {p['batch_size']} x seq {p['seq_len']} = {p['tokens_per_step']} tokens"
        f" (micro-batch {p['micro_batch_size']}), grad clip {'on' if p['grad_clip'] else 'off'}",
        f"host memory   {_b(p['host_bytes']):>12}",
    ]
    lines += [f"  {k:<24}{_b(v):>12}" for k, v in p["host_breakdown"].items() if v]
    where = "host RAM" if m["device"] == "cpu" else "GPU"
    lines.append(f"device memory {_b(p['device_bytes']):>12}   ({where})")
    lines += [f"  {k:<24}{_b(v):>12}" for k, v in p["device_breakdown"].items() if v]
    lines.append(f"PCIe per step {_b(p['pcie_bytes_per_step']):>12}"
                 + ("   (no bus on the CPU device)" if m["device"] == "cpu" else
                    f"   (weights H2D {_b(p['pcie_breakdown']['weights_h2d'])}, grads D2H {_b(p['pcie_breakdown']['grads_d2h'])})"))
    a = p["activations"]
    b = a["blocks"]
    lines.append(f"activations   budget {_b(a['budget_bytes'])}: blocks keep {b['keep']}, offload {b['offload']}, "
                 f"partial {b['partial']}, recompute {b['recompute']} (kept {_b(a['kept_bytes'])}, offloaded "
                 f"{_b(a['offloaded_bytes'])}, {_b(a['unit_bytes'])} per block and micro-batch); "
                 f"{a['flops_per_step'] / 1e12:.3g} TFLOP per step; {_b(a['bytes_moved'])} moved per step")
    terms = ", ".join(f"{k[:-2]} {v:.3g} s" for k, v in p["step_time_terms_s"].items())
    lines.append(f"step time >= {p['step_time_lower_bound_s']:.3g} s ({terms})")
    lines.append(f"  assumed: {p['assumptions']}")
    from .engine.offload import tier_plan_lines, tier_plan_why

    lines += tier_plan_lines(p)
    avail = f"{_b(m['host_available_bytes'])} host RAM available"
    if m["device"] == "cuda":
        avail += f", {m['name']} with {_b(m['device_bytes'])} free"
    verdict = "fits" if p["fits"] else "does NOT fit"
    why = []
    if not p["fits_host"]:
        need = p["host_bytes"] + (p["device_bytes"] if m["device"] == "cpu" else 0)
        why.append(f"needs {_b(need)} of host memory, {_b(m['host_usable_bytes'])} usable")
    if not p["fits_device"]:
        why.append(f"needs {_b(p['device_bytes'])} of GPU memory, {_b(m['device_bytes'])} free")
    why += tier_plan_why(p)
    lines.append(f"this machine ({avail}): {verdict}" + (f": {'; '.join(why)}" if why else ""))
    return "\n".join(lines)
