"""The tooling around the GPU path that runs on any machine: `horizon doctor`'s report of host
page-locking, and scripts/gpu-check.sh's plan and budgets (its dry run)."""

from __future__ import annotations

from horizon import doctor


def test_doctor_reports_the_pinning_state():
    info = doctor.collect()
    hs = info["host_store"]
    assert hs["pin_state"] in ("pinned", "failed")
    assert hs["pinned_ranges"] == (1 if hs["pin_state"] == "pinned" else 0)
    text = doctor.render(info)
    line = next(x for x in text.splitlines() if x.startswith("pinning"))
    if hs["pin_state"] == "failed":  # e.g. no driver here: says why, and what it costs
        assert hs["pin_note"] in line and "pageable" in line
    else:
        assert line.split()[1] == "ok:" and "1 registration" in line


def test_pin_summary_states():
    ok = doctor.pin_summary({"pin_state": "pinned", "pinned_bytes": 6 << 20, "pinned_ranges": 1})
    assert ok.startswith("ok: 6.0 MiB") and "1 registration " in ok
    bad = doctor.pin_summary({"pin_state": "failed", "pin_note": "cuMemHostRegister ... failed (OOM)"})
    assert bad.startswith("failed: cuMemHostRegister") and "pageable" in bad
    assert doctor.pin_summary({"pin_state": "not requested"}) == "not requested"


# ---------------------------------------------------------------- scripts/gpu-check.sh


import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zipfile  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mode, limit", [("run", 420), ("quick", 240)])
def test_gpu_check_dry_run_shows_budgets_that_fit(mode, limit):
    """The plan's budgets fit the device time an issue gets: a full call under 420 s and a
    quick re-run under 240 s (15 minutes with the cold starts), each step with its limit."""
    r = subprocess.run(["bash", "scripts/gpu-check.sh", mode, "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = dict(re.findall(r"^  (\w+)\s+(\d+)\s{3}", r.stdout, re.M))
    total = int(steps.pop("total"))
    assert total == sum(int(v) for v in steps.values()) and total <= limit
    assert f"(limit {limit}; per test 60 s)" in r.stdout
    assert ("tests" in steps or "quick_tests" in steps) and any("ceilings" in s for s in steps)
    assert f"timeout_s={limit + 30}" in r.stdout  # the device tool's limit leaves the script room


def _write_tests(path, body):
    path.mkdir()
    (path / "conftest.py").write_text("")
    (path / "test_cases.py").write_text(body)


def test_gpu_tests_driver_costs_a_hanging_test_one_test(tmp_path):
    """A test that never returns (as a kernel that never finishes) is ended after the per-test
    limit and recorded; the tests after it still run, in a new process."""
    _write_tests(tmp_path / "suite", "import time\n"
                 "def test_a():\n    pass\n"
                 "def test_hangs():\n    time.sleep(600)\n"
                 "def test_c():\n    assert 1 + 1 == 2\n"
                 "def test_d():\n    assert False\n")
    results = tmp_path / "results.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_tests.py"), "--budget", "120", "--per-test", "3",
                        "--results", str(results), "--", str(tmp_path / "suite")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    got = {json.loads(line)["nodeid"].split("::")[-1]: json.loads(line)["outcome"]
           for line in results.read_text().splitlines()}
    assert got == {"test_a": "passed", "test_hangs": "timeout", "test_c": "passed", "test_d": "failed"}, r.stdout
    assert r.returncode == 1 and "timeout  " in r.stdout


def test_gpu_tests_driver_with_skips_fail_fails_a_run_where_tests_skipped(tmp_path):
    # gpu-check.sh passes --skips-fail: on a GPU machine a skipped GPU test (no CUDA there, a
    # missing kernel) is a failure of the check, not a pass.
    _write_tests(tmp_path / "suite", "import pytest\n"
                 "def test_a():\n    pass\n"
                 "@pytest.mark.skip(reason='no CUDA GPU on this machine')\ndef test_b():\n    pass\n")
    for flag, rc in (([], 0), (["--skips-fail"], 1)):
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_tests.py"), "--budget", "60", "--per-test", "20",
                            *flag, "--results", str(tmp_path / "r.jsonl"), "--", str(tmp_path / "suite")],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == rc, (flag, r.stdout)
    assert "1 of 2 tests skipped" in r.stdout
    assert "--skips-fail" in (ROOT / "scripts" / "gpu-check.sh").read_text()


def test_gpu_tests_driver_stops_at_its_budget(tmp_path):
    _write_tests(tmp_path / "suite", "import time\n" + "".join(f"def test_{i}():\n    time.sleep(2)\n" for i in range(6)))
    results = tmp_path / "results.jsonl"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_tests.py"), "--budget", "25", "--per-test", "20",
                    "--results", str(results), "--", str(tmp_path / "suite")],
                   cwd=tmp_path, capture_output=True, text=True, timeout=120)
    outcomes = [json.loads(line)["outcome"] for line in results.read_text().splitlines()]
    assert len(outcomes) == 6 and set(outcomes) <= {"passed", "not run", "timeout"} and "passed" in outcomes


def test_bench_rows_survive_a_killed_benchmark(tmp_path):
    out = tmp_path / "rows.jsonl"
    code = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]); from gpu_rows import Rows; "
            "r = Rows(sys.argv[2], 'b'); r.add({'x': 1}); r.add({'y': 2}); os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", code, str(ROOT / "benches"), str(out)], capture_output=True)
    sys.path.insert(0, str(ROOT / "benches"))
    try:
        from gpu_rows import read_rows
    finally:
        sys.path.remove(str(ROOT / "benches"))
    rows = read_rows(out)
    assert [(r["bench"], r.get("x"), r.get("y")) for r in rows] == [("b", 1, None), ("b", None, 2)]


def _fake_wheel(path, name, needs):
    whl = path / name
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("horizon/_native.abi3.so", b"\x7fELF" + b"".join(f"GLIBC_{v}\x00".encode() for v in needs))
    return str(whl)


def test_wheel_glibc_tag_must_cover_the_symbols(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import wheel_glibc
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    ok = _fake_wheel(tmp_path, "h-0.1.0-cp39-abi3-manylinux_2_34_x86_64.whl", ["2.2.5", "2.17", "2.34"])
    assert wheel_glibc.check(ok) == []
    low = _fake_wheel(tmp_path, "h-0.1.0-cp39-abi3-manylinux_2_28_x86_64.whl", ["2.17", "2.34"])
    assert "2.34" in wheel_glibc.check(low)[0]
    untagged = _fake_wheel(tmp_path, "h-0.1.0-cp39-abi3-linux_x86_64.whl", ["2.17"])
    assert wheel_glibc.check(untagged)
    legacy = _fake_wheel(tmp_path, "h-0.1.0-cp39-abi3-manylinux2014_x86_64.whl", ["2.17"])
    assert wheel_glibc.check(legacy) == []
    native = ROOT / "src" / "horizon" / "_native.abi3.so"
    if native.exists():  # the module built here asks for a real glibc version
        need = wheel_glibc.needed_glibc(native.read_bytes())
        assert need is not None and need >= (2, 2)
    host = wheel_glibc.host_glibc()
    too_new = _fake_wheel(tmp_path, "h-0.1.0-cp39-abi3-manylinux_2_99_x86_64.whl", ["2.99"])
    if host is not None:
        assert any("this machine" in p for p in wheel_glibc.check(too_new, host=True))
