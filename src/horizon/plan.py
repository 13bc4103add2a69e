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
from .errors import HorizonError
from .models import layer_defs, resolve

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


def _block_activation_bytes(s, tokens: int) -> int:
    """Live bytes of one block's recompute + backward for `tokens` tokens, in bf16: the saved
    forward tensors (block input, two norm outputs, q/k/v, attention output, attention-out and
    MLP-out residuals, gate/up/product of the MLP; for MoE the k routed copies and the router
    logits) and as much again for their gradients. Attention is assumed memory-efficient (no
    sequence x sequence matrix)."""
    if not hasattr(s, "num_heads"):  # the hf path: transformers' modules, sizes not ours to read;
        return 2 * 2 * tokens * 16 * s.hidden_size  # a generous per-token allowance (16 hidden vectors)
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    if s.is_moe:
        mlp = 3 * (s.num_experts_per_tok * s.moe_intermediate_size + s.num_experts)
    else:
        mlp = 3 * s.intermediate_size
    per_token = 5 * s.hidden_size + q + 2 * kv + q + mlp
    return 2 * 2 * tokens * per_token


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


def _host_available() -> int:
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError):
            avail = 0
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(p).read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < (1 << 60):
            used = 0
            for q in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
                try:
                    used = int(open(q).read().strip())
                    break
                except (OSError, ValueError):
                    continue
            avail = min(avail, max(0, int(raw) - used))
    return avail


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def this_machine(device: str = "auto") -> Machine:
    """The machine a run on `device` (an EngineConfig device) would use, as it is now."""
    host = _host_available()
    if device == "cpu":
        return Machine("cpu", "CPU", host, 0, _cores(), process_rss())
    import torch

    from .engine.config import resolve_device

    dev = resolve_device(device)
    if dev.type != "cuda":
        return Machine("cpu", "CPU", host, 0, _cores(), process_rss())
    free, total = torch.cuda.mem_get_info(dev.index)
    # After the CUDA context exists, so the resident size counts it.
    return Machine("cuda", torch.cuda.get_device_name(dev.index), _host_available(), int(free), _cores(),
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
              model_path: str = "auto", offload_dir: str | None = None) -> dict:
    """The footprint and step-time bound of training `config` at these sizes on `machine`
    (`compute_dtype`: "float32" or "bfloat16"; None: bf16 on a GPU, fp32 on the CPU;
    `model_path`: as `horizon train --model-path`; with `offload_dir`: with the disk tier there,
    see engine/offload.py)."""
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
    checkpoints = s.num_layers * tokens * s.hidden_size * c
    device = {
        "weight_slots": WEIGHT_SLOTS * c * largest,
        # the engine's persistent fp32 gradient buffers: two alternating ones of the largest layer
        # and one for the embedding (engine/schedule.py `_grad_acc`)
        "grad_accumulator_fp32": 4 * (2 * largest + layers[0][1]),
        "activation_checkpoints": checkpoints,
        "hidden_states": 2 * tokens * s.hidden_size * c,  # the layer's outputs and their gradients
        "block_activations": _block_activation_bytes(s, mb * seq_len) * c // 2,
        "loss_chunk": 2 * 4 * min(LOSS_CHUNK_TOKENS, mb * seq_len) * s.vocab_size,
    }
    offloaded = False
    if machine.device == "cuda" and sum(device.values()) > machine.device_bytes:
        # The checkpoints move to pinned host memory when they do not fit beside the rest.
        offloaded = True
        device["activation_checkpoints"] = 0
        host["offloaded_checkpoints"] = checkpoints
    host_total = sum(host.values())
    device_total = sum(device.values())

    flops, h2d, d2h, assumed = _rates(machine)
    compute_s = 8 * n * tokens / flops   # forward 2NT + recompute 2NT + backward 4NT
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
        "pcie_bytes_per_step": sum(pcie.values()), "pcie_breakdown": pcie,
        "step_time_lower_bound_s": step_s, "step_time_terms_s": bounds,
        "tokens_per_s_upper_bound": tokens / step_s if step_s > 0 else math.inf,
        "assumptions": f"{assumed}; host memory {HOST_MEMORY_GBPS:g} GB/s for AdamW "
                       f"({ADAM_BYTES_PER_PARAM} B/param); compute 8*N*T FLOPs (forward, recompute, backward)",
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
