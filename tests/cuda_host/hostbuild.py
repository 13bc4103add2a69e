"""Builds kernel files of cuda/ for the host runtime (host_runtime.h) with g++ and runs the
Python ops' own launches on it: `HostDevice.patch` makes the ops take their CUDA branch with
CPU tensors (`FakeCuda` reports is_cuda) and turns each `native.launch` into a host run of the
kernel with exactly the grid, block, shared memory and argument list the op passed.

The sources are compiled as they are, with one rewrite: a dynamic shared-memory declaration
`extern __shared__ T name[];` becomes a pointer to the block's (NaN-filled) dynamic buffer."""

from __future__ import annotations

import ctypes
import os
import pathlib
import re
import shutil
import struct
import subprocess

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
# Another tree of kernel sources (a deliberately broken copy, to see the tests fail) may be
# named by HORIZON_HOST_CUDA_DIR.
CUDA = pathlib.Path(os.environ.get("HORIZON_HOST_CUDA_DIR", ROOT / "cuda"))

_DYN = re.compile(r"extern\s+__shared__\s+(?:alignas\(\d+\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;")
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(')


def host_source(path: pathlib.Path) -> str:
    src = path.read_text()
    return _DYN.sub(lambda m: f"{m.group(1)}* {m.group(2)} = reinterpret_cast<{m.group(1)}*>("
                    "horizon_host::dynamic_smem());", src)


def kernel_names(src: str) -> list:
    return _KERNEL.findall(re.sub(r"//[^\n]*", "", src))


def build_kernels(files, build_dir: pathlib.Path) -> "HostKernels":
    """files: paths relative to cuda/ (e.g. "layers/rmsnorm.cu") or absolute, compiled as one unity
    translation unit with host_kernels.cpp into build_dir. Skips the test without g++."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the host runs of the CUDA kernels")
    srcs = [host_source(CUDA / f) for f in files]
    names = [n for s in srcs for n in kernel_names(s)]
    (build_dir / "host_unity.cu").write_text("\n".join(srcs))
    (build_dir / "host_kernel_list.inc").write_text("".join(f"HORIZON_HOST_KERNEL({n})\n" for n in names))
    lib = build_dir / "libhorizon_host_kernels.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-fno-strict-aliasing", "-DHORIZON_HOST_MMA",
           "-I", str(build_dir), "-I", str(HERE / "shim"), "-I", str(CUDA), "-o", str(lib),
           str(HERE / "host_kernels.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return HostKernels(ctypes.CDLL(str(lib)), names)


_KINDS = {"ptr": "p", "i32": "i", "u32": "i", "i64": "l", "f32": "f"}


class FakeCuda(torch.Tensor):
    """A CPU tensor that takes the ops' CUDA branch."""

    @property
    def is_cuda(self):
        return True


def fake(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().as_subclass(FakeCuda)


class HostKernels:
    def __init__(self, lib, names):
        self.lib, self.names = lib, set(names)
        lib.horizon_host_launch.restype = ctypes.c_int
        lib.horizon_host_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_ulonglong,
                                            ctypes.c_char_p, ctypes.POINTER(ctypes.c_ulonglong), ctypes.c_char_p,
                                            ctypes.c_double, ctypes.c_uint]
        self.launches = []
        self.cooperative = []  # per launch: whether the op asked for a cooperative launch
        self.resident = None  # blocks that start (None: all; fewer: a grid not co-resident)

    def run(self, kernel, grid, block, args, shared_mem=0, limit_s=120.0, resident=None) -> int:
        """Runs the kernel on the host; returns the number of blocks that deadlocked or ran
        past limit_s (an unknown kernel or argument kinds that differ from its signature raise).
        `resident`: only that many blocks start (gridDim still says grid)."""
        grid, block = tuple(grid), tuple(block)
        assert all(d == 1 for d in grid[1:]) and all(d == 1 for d in block[1:]), (kernel, grid, block)
        kinds = "".join(_KINDS[k] for k, _ in args)
        vals = []
        for k, v in args:
            if k == "f32":
                vals.append(struct.unpack("<I", struct.pack("<f", v))[0])
            else:
                vals.append(int(v) & (2**64 - 1))
        arr = (ctypes.c_ulonglong * max(1, len(vals)))(*vals)
        expect = ctypes.create_string_buffer(64)
        rc = self.lib.horizon_host_launch(kernel.encode(), grid[0], block[0], int(shared_mem), kinds.encode(), arr,
                                          expect, float(limit_s), 2**32 - 1 if resident is None else int(resident))
        self.launches.append((kernel, grid, block, shared_mem))
        assert rc != -1, f"{kernel}: not a kernel of this host build"
        assert rc != -2, f"{kernel}: launched with kinds {kinds}, the kernel takes {expect.value.decode()}"
        return rc

    def launch(self, kernel, grid, block, args, shared_mem=0, device=None, cooperative=False):
        """native.launch's signature; runs the kernel on the host (all blocks run at once, as a
        cooperative launch guarantees, unless `resident` says otherwise), raises on any failure."""
        self.cooperative.append(bool(cooperative))
        rc = self.run(kernel, grid, block, args, shared_mem, resident=self.resident)
        assert rc == 0, f"{kernel}: {rc} block(s) deadlocked or ran past the time limit"

    def patch(self, monkeypatch, sms=2, blocks_per_sm=2):
        """Route the ops' kernel launches here, as on a device with `sms` SMs on which the
        occupancy query finds room for `blocks_per_sm` blocks of every kernel."""
        from horizon import native
        from horizon.kernels import _common, norm
        from horizon.kernels.moe import fused as moe_fused

        props = type("P", (), {"multi_processor_count": sms})()
        monkeypatch.setattr(native, "launch", self.launch)
        monkeypatch.setattr(moe_fused, "_occupancy", lambda kernel, index: blocks_per_sm)
        monkeypatch.setattr(norm, "_bwd_blocks_per_sm", lambda H, index: blocks_per_sm)
        monkeypatch.setattr(native, "can_launch", lambda t, k: k in self.names)
        monkeypatch.setattr(_common, "sm_count", lambda index: sms)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
