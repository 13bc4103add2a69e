"""`horizon doctor`: what Horizon sees of this machine, as text or one JSON object."""

from __future__ import annotations

import json
import platform

from . import __version__


def collect(disk=None) -> dict:
    from . import native

    info = dict(native.system_info())
    info["horizon_version"] = __version__
    info["python_version"] = platform.python_version()
    try:
        import torch

        info["torch_version"] = torch.__version__
        info["torch_cuda_build"] = torch.version.cuda
        info["torch_cuda_available"] = bool(torch.cuda.is_available())
    except Exception as e:  # torch missing or broken: report, do not crash
        info["torch_version"] = None
        info["torch_error"] = f"{type(e).__name__}: {e}"
    try:
        from .store import probe

        info["host_store"] = probe()
    except Exception as e:  # report, never crash
        info["host_store"] = {"error": f"{type(e).__name__}: {e}"}
    from .engine import offload

    info["disk_io"] = offload.disk_io_info()
    if disk is not None:  # `--disk DIR`: measured here, saved in DIR for `horizon plan`
        info["disk"] = offload.doctor_disk(disk)
    archs: dict[str, list[str]] = {}
    for k in info["kernels"]:
        archs.setdefault(k["name"], []).append(k["arch"])
    info["kernel_archs"] = archs
    return info


def _gib(b) -> str:
    return f"{(b or 0) / 2**30:.1f} GiB"


def _driver(v) -> str:
    return "none" if v is None else f"{v // 1000}.{(v % 1000) // 10}"


def render(info: dict) -> str:
    lines = [
        f"horizon        {info['horizon_version']} (native {info['native_version']}), Python {info['python_version']}",
        f"torch          {info.get('torch_version') or 'not importable: ' + info.get('torch_error', '')}"
        + (f" (built for CUDA {info['torch_cuda_build']})" if info.get("torch_cuda_build") else ""),
        f"CPU SIMD       {info['simd']} (hardware: {info['simd_hardware']})",
        f"host RAM       {_gib(info['host_memory_total_bytes'])} total, {_gib(info['host_memory_available_bytes'])} available",
    ]
    for n in info["numa_nodes"]:
        cpus = n["cpus"]
        lines.append(
            f"NUMA node {n['id']:<4} {len(cpus)} CPUs ({_cpus(cpus)}), {_gib(n['memory_total_bytes'])} memory"
        )
    hs = info.get("host_store") or {}
    if "error" in hs:
        lines.append(f"host store     probe failed: {hs['error']}")
    elif hs:
        bind = f"bound to node {hs['numa_node']}" if hs.get("bound") else f"not bound ({hs.get('bind_note')})"
        huge = "huge pages requested" if hs.get("huge_pages_requested") else f"no huge pages ({hs.get('huge_pages_note')})"
        lines.append(f"host store     {bind}; {huge}")
        lines.append(f"pinning        {pin_summary(hs)}")
    from .engine.offload import doctor_lines

    lines += doctor_lines(info)
    if info["cuda_driver_present"]:
        lines.append(f"CUDA driver    present, version {_driver(info['cuda_driver_version'])}")
    else:
        lines.append("CUDA driver    not present (libcuda not found): the CPU is the device")
    if info.get("gpu_error"):
        lines.append(f"GPUs           error: {info['gpu_error']}")
    for g in info["gpus"]:
        cc = ".".join(str(c) for c in g["compute_capability"])
        lines.append(
            f"GPU {g['ordinal']:<10} {g['name']}, {_gib(g['total_memory_bytes'])}, sm {cc}, "
            f"{g['multiprocessors']} SMs, PCI {g['pci_bus_id']}, NUMA node {g['numa_node'] if g['numa_node'] is not None else 'unknown'}"
        )
    lines.append(f"kernel build   {info['kernel_build'].split(':')[0]}")
    for name, archs in sorted(info["kernel_archs"].items()):
        lines.append(f"  kernel       {name} [{', '.join(archs)}]")
    if not info["kernel_archs"]:
        lines.append("  (no embedded kernels: GPU ops use their torch fallbacks)")
    return "\n".join(lines)


def pin_summary(p: dict) -> str:
    """What page-locking did to the probe region, from its placement: each buffer that
    crosses PCIe is registered as one piece, so it is pinned whole or stays pageable whole."""
    state = p.get("pin_state") or ("pinned" if p.get("pinned_bytes") else "not requested")
    if state == "pinned":
        n = p.get("pinned_ranges") or 1
        return (f"ok: {p.get('pinned_bytes', 0) / 2**20:.1f} MiB page-locked as {n} registration{'s' * (n > 1)} "
                "(buffers that cross PCIe are registered whole)")
    if state == "failed":
        return (f"failed: {p.get('pin_note') or 'unknown reason'} (host buffers stay pageable: copies to and from "
                "the GPU are synchronous and slower)")
    return "not requested"


def _cpus(cpus: list) -> str:
    if not cpus:
        return "-"
    runs, start, prev = [], cpus[0], cpus[0]
    for c in cpus[1:] + [None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        runs.append(f"{start}-{prev}" if prev != start else f"{start}")
        if c is not None:
            start = prev = c
    return ",".join(runs)


def main(as_json: bool, disk=None) -> int:
    info = collect(disk)
    print(json.dumps(info, indent=2) if as_json else render(info))
    return 0
