"""The foundation: the native module loads, reports the machine, embeds its kernels, never
lets a panic through, and the CLI rejects bad usage."""

import json
import os
import subprocess
import sys

import pytest
import torch

import horizon
from horizon import _native, native
from horizon.kernels import accumulate_grad_
from horizon.kernels.grad import accumulate_grad_reference


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "horizon", *args], capture_output=True, text=True)


def test_doctor_json_parses_and_lists_kernels():
    r = run_cli("doctor", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["horizon_version"] == horizon.__version__
    assert info["simd"] in ("avx512", "avx2", "scalar")
    assert info["host_memory_total_bytes"] > 0
    assert info["numa_nodes"] and all("cpus" in n for n in info["numa_nodes"])
    assert isinstance(info["cuda_driver_present"], bool)
    if info["kernel_build"].startswith("ok"):
        assert "horizon_acc_bf16_to_f32" in info["kernel_archs"]
        assert set(info["kernel_archs"]["horizon_acc_bf16_to_f32"]) == {"sm_80", "sm_90a"}


def test_doctor_text_names_the_device_situation():
    r = run_cli("doctor")
    assert r.returncode == 0, r.stderr
    assert "CUDA driver" in r.stdout and "CPU SIMD" in r.stdout


def test_kernels_are_embedded_when_nvcc_was_found():
    status = native.system_info()["kernel_build"]
    if not status.startswith("ok"):
        # `make test` installs the pinned nvcc wheels and sets HORIZON_REQUIRE_KERNELS: there a
        # build without kernels is a failure, not a skip.
        if os.environ.get("HORIZON_REQUIRE_KERNELS"):
            pytest.fail(f"this build has no kernels: {status}")
        pytest.skip(f"this build has no kernels: {status}")
    assert _native.has_kernels()
    assert "horizon_acc_bf16_to_f32" in native.kernel_names()


def test_no_kernel_spills_registers():
    kernels = native.system_info()["kernels"]
    spilling = [k for k in kernels if k["spill_store_bytes"] or k["spill_load_bytes"]]
    assert not spilling, f"kernels spill registers: {spilling}"


def test_panic_becomes_horizon_error():
    with pytest.raises(horizon.HorizonError, match="boom"):
        _native._panic_for_test("boom")
    # and it is an ordinary Exception, catchable as such
    assert issubclass(horizon.HorizonError, Exception)


def test_launch_without_a_driver_is_a_clear_error():
    if _native.cuda_driver_present():
        pytest.skip("a CUDA driver is present")
    with pytest.raises(horizon.HorizonError, match="no CUDA driver|no kernels"):
        _native.launch("horizon_acc_bf16_to_f32", (1,), (32,), 0, 0, 0, [("ptr", 0)])


def test_launch_rejects_bad_arguments():
    with pytest.raises(horizon.HorizonError, match="unknown kind"):
        _native.launch("x", (1,), (1,), 0, 0, 0, [("float128", 1)])
    with pytest.raises(horizon.HorizonError, match="grid"):
        _native.launch("x", (1, 1, 1, 1), (1,), 0, 0, 0, [])


@pytest.mark.parametrize("argv", [["bogus"], ["doctor", "--no-such-flag"], []])
def test_cli_bad_usage_exits_2_with_usage(argv):
    r = run_cli(*argv)
    assert r.returncode == 2
    assert "usage:" in r.stderr
    assert "Traceback" not in r.stderr


def test_accumulate_cpu_fallback_matches_reference():
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(1001, generator=g)
    grad = torch.randn(1001, generator=g).to(torch.bfloat16)
    expect = acc.clone() + 0.5 * grad.float()
    accumulate_grad_(acc, grad, 0.5)
    torch.testing.assert_close(acc, expect, rtol=0, atol=0)


def test_accumulate_rejects_bad_input():
    with pytest.raises(horizon.HorizonError, match="float32"):
        accumulate_grad_(torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(horizon.HorizonError, match="shapes"):
        accumulate_grad_(torch.zeros(4), torch.zeros(5, dtype=torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 7, 8, 1023, 4097, 1_000_003])
def test_accumulate_kernel_matches_torch(n):
    assert native.has_kernels(), "GPU test run on a build without kernels"
    g = torch.Generator(device="cuda").manual_seed(n)
    acc = torch.randn(n, device="cuda", generator=g)
    grad = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
    ref = accumulate_grad_reference(acc.clone(), grad, 0.37)
    out = accumulate_grad_(acc, grad, 0.37)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # an unaligned view takes the scalar path and must still be exact
    acc2 = torch.randn(n + 1, device="cuda", generator=g)[1:]
    grad2 = torch.randn(n + 1, device="cuda", generator=g).to(torch.bfloat16)[1:]
    ref2 = accumulate_grad_reference(acc2.clone(), grad2, -2.0)
    accumulate_grad_(acc2, grad2, -2.0)
    torch.testing.assert_close(acc2, ref2, rtol=1e-6, atol=1e-6)


def test_occupancy_query_without_a_driver_is_a_clear_error():
    if _native.cuda_driver_present():
        pytest.skip("a CUDA driver is present")
    with pytest.raises(horizon.HorizonError, match="no CUDA driver|no kernels"):
        _native.max_active_blocks_per_sm("horizon_acc_bf16_to_f32", 256, 0)


@pytest.mark.gpu
def test_occupancy_query_reports_co_resident_blocks():
    torch.zeros(1, device="cuda")  # torch's context is current
    n = _native.max_active_blocks_per_sm("horizon_acc_bf16_to_f32", 256, 0, torch.cuda.current_device())
    assert 1 <= n <= 32
