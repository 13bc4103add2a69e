"""`horizon plan`: what a training run will need (host bytes by kind of state, device bytes, PCIe
bytes per step, a step-time lower bound) and whether it fits this machine. `horizon train` asks
the same question before it allocates anything.

The footprint follows DESIGN.md ("Footprint"): host 14 bytes per parameter (fp32 master 4, Adam
m and v 8, bf16 compute copy 2) plus 4 for the fp32 gradient buffer with gradient clipping, plus
gradient landing slots and any offloaded activation checkpoints; device = weight slots of the
largest layer + its fp32 gradient accumulator + activation checkpoints + one block's live
activations.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import HorizonError

DENSE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
ARCHITECTURES = DENSE_ARCHITECTURES + MOE_ARCHITECTURES

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


def _int(config: dict, key: str, default=None, minimum: int = 1) -> int:
    v = config.get(key, default)
    if v is None:
        raise HorizonError(f"model config has no {key!r}")
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise HorizonError(f"model config {key!r} must be an integer >= {minimum}, got {v!r}")
    return v


def architecture(config: dict) -> str:
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        mt = config.get("model_type")
        raise HorizonError(f"model config has no 'architectures' list (model_type {mt!r}); cannot tell what model this is")
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise HorizonError(f"unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    return arch


@dataclass
class ModelShape:
    arch: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    max_positions: int
    experts: int = 0
    top_k: int = 0
    moe_intermediate: int = 0
    sparse_layers: tuple = ()

    @property
    def is_moe(self) -> bool:
        return self.experts > 0


def model_shape(config: dict) -> ModelShape:
    """Reads and validates the sizes of a supported architecture's config.json."""
    if not isinstance(config, dict):
        raise HorizonError("model config must be a JSON object")
    arch = architecture(config)
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    kv = _int(config, "num_key_value_heads", heads)
    if heads % kv:
        raise HorizonError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    head_dim = config.get("head_dim") or hidden // heads
    layers = _int(config, "num_hidden_layers")
    s = ModelShape(
        arch=arch, vocab=_int(config, "vocab_size"), hidden=hidden, layers=layers, heads=heads,
        kv_heads=kv, head_dim=_int({"head_dim": head_dim}, "head_dim"),
        intermediate=_int(config, "intermediate_size"),
        tied=bool(config.get("tie_word_embeddings", False)),
        max_positions=_int(config, "max_position_embeddings", 2048),
    )
    if arch == "MixtralForCausalLM":
        s.experts = _int(config, "num_local_experts")
        s.top_k = _int(config, "num_experts_per_tok")
        s.moe_intermediate = s.intermediate
        s.sparse_layers = tuple(range(layers))
    elif arch == "Qwen3MoeForCausalLM":
        s.experts = _int(config, "num_experts")
        s.top_k = _int(config, "num_experts_per_tok")
        s.moe_intermediate = _int(config, "moe_intermediate_size")
        step = _int(config, "decoder_sparse_step", 1)
        dense_only = set(config.get("mlp_only_layers") or [])
        s.sparse_layers = tuple(i for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
    if s.is_moe and s.top_k > s.experts:
        raise HorizonError(f"num_experts_per_tok {s.top_k} exceeds the number of experts {s.experts}")
    return s


def _attention_params(s: ModelShape, config: dict) -> int:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    n = s.hidden * q + 2 * s.hidden * kv + q * s.hidden
    if s.arch == "Qwen2ForCausalLM":
        n += q + 2 * kv  # q, k, v biases
    elif config.get("attention_bias"):
        n += q + 2 * kv + s.hidden
    if s.arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        n += 2 * s.head_dim  # q_norm, k_norm
    return n


def layer_parameters(config: dict) -> list[tuple[str, int]]:
    """Parameters per streamed layer, in order: embedding, each block, final norm + head."""
    s = model_shape(config)
    attn = _attention_params(s, config)
    mlp_bias = bool(config.get("mlp_bias")) and s.arch == "LlamaForCausalLM"
    dense_mlp = 3 * s.hidden * s.intermediate + (2 * s.intermediate + s.hidden if mlp_bias else 0)
    moe_mlp = s.experts * 3 * s.hidden * s.moe_intermediate + s.hidden * s.experts
    out = [("embed", s.vocab * s.hidden)]
    sparse = set(s.sparse_layers)
    for i in range(s.layers):
        out.append((f"block.{i}", attn + 2 * s.hidden + (moe_mlp if i in sparse else dense_mlp)))
    out.append(("head", s.hidden + (0 if s.tied else s.vocab * s.hidden)))
    return out


def count_parameters(config: dict) -> int:
    return sum(n for _, n in layer_parameters(config))


def _block_activation_bytes(s: ModelShape, tokens: int) -> int:
    """Live bytes of one block's recompute + backward for `tokens` tokens, in bf16: the saved
    forward tensors (block input, two norm outputs, q/k/v, attention output, attention-out and
    MLP-out residuals, gate/up/product of the MLP; for MoE the k routed copies and the router
    logits) and as much again for their gradients. Attention is assumed memory-efficient (no
    sequence x sequence matrix)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    mlp = 3 * (s.top_k * s.moe_intermediate + s.experts) if s.is_moe else 3 * s.intermediate
    per_token = 5 * s.hidden + q + 2 * kv + q + mlp
    return 2 * 2 * tokens * per_token


@dataclass
class Machine:
    device: str            # "cuda" or "cpu"
    name: str
    host_bytes: int        # memory available to this process now
    device_bytes: int      # GPU memory; 0 on the CPU (device bytes then come from host memory)
    cores: int


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
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise HorizonError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)")
    host = _host_available()
    if device == "cpu":
        return Machine("cpu", "CPU", host, 0, _cores())
    import torch

    if not torch.cuda.is_available():
        if device != "auto":
            raise HorizonError(f"device {device!r} requested but no CUDA GPU is available")
        return Machine("cpu", "CPU", host, 0, _cores())
    idx = torch.device(device if device != "auto" else "cuda").index or 0
    if idx >= torch.cuda.device_count():
        raise HorizonError(f"device {device!r} does not exist ({torch.cuda.device_count()} GPUs)")
    free, total = torch.cuda.mem_get_info(idx)
    return Machine("cuda", torch.cuda.get_device_name(idx), host, int(free), _cores())


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
              grad_clip: bool = False, machine: Machine | None = None) -> dict:
    """The footprint and step-time bound of training `config` at these sizes on `machine`."""
    for name, v in (("batch size", batch_size), ("sequence length", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise HorizonError(f"{name} must be a positive integer, got {v!r}")
    mb = batch_size if micro_batch_size is None else micro_batch_size
    if isinstance(mb, bool) or not isinstance(mb, int) or mb < 1 or mb > batch_size:
        raise HorizonError(f"micro batch size must be between 1 and the batch size {batch_size}, got {mb!r}")
    s = model_shape(config)
    machine = machine or this_machine()
    layers = layer_parameters(config)
    n = sum(p for _, p in layers)
    largest = max(p for _, p in layers)
    tokens = batch_size * seq_len

    host = {
        "master_fp32": 4 * n,
        "adam_moments_fp32": 8 * n,
        "compute_copy_bf16": 2 * n,
        "grad_buffer_fp32": 4 * n if grad_clip else 0,
        "landing_slots": LANDING_SLOTS * 4 * largest,
    }
    checkpoints = s.layers * tokens * s.hidden * 2
    device = {
        "weight_slots": WEIGHT_SLOTS * 2 * largest,
        "grad_accumulator_fp32": 4 * largest,
        "activation_checkpoints": checkpoints,
        "block_activations": _block_activation_bytes(s, mb * seq_len),
        "loss_chunk": 2 * 4 * min(LOSS_CHUNK_TOKENS, mb * seq_len) * s.vocab,
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
    if machine.device == "cuda":
        fits_host = host_total <= machine.host_bytes - margin
        fits_device = device_total <= machine.device_bytes
    else:
        fits_host = host_total + device_total <= machine.host_bytes - margin
        fits_device = True
    return {
        "architecture": s.arch,
        "parameters": n,
        "layers": s.layers,
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
                    "device_bytes": machine.device_bytes, "cores": machine.cores, "host_margin_bytes": margin},
        "fits_host": fits_host, "fits_device": fits_device, "fits": fits_host and fits_device,
    }


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
    avail = f"{_b(m['host_available_bytes'])} host RAM available"
    if m["device"] == "cuda":
        avail += f", {m['name']} with {_b(m['device_bytes'])} free"
    verdict = "fits" if p["fits"] else "does NOT fit"
    why = []
    if not p["fits_host"]:
        need = p["host_bytes"] + (p["device_bytes"] if m["device"] == "cpu" else 0)
        why.append(f"needs {_b(need)} of host memory, {_b(max(0, m['host_available_bytes'] - m['host_margin_bytes']))} usable")
    if not p["fits_device"]:
        why.append(f"needs {_b(p['device_bytes'])} of GPU memory, {_b(m['device_bytes'])} free")
    lines.append(f"this machine ({avail}): {verdict}" + (f": {'; '.join(why)}" if why else ""))
    return "\n".join(lines)
