"""`pytest -m gpu` for scripts/gpu-check.sh, inside a time budget, where one hanging test costs
that test and not the run.

As a driver (`python scripts/gpu_tests.py --budget S --per-test S [--only-failed FILE] -- ARGS`):
runs pytest in a child process with this file as a plugin; when a test hangs, the child is
ended after the per-test limit, the test is recorded as timed out, and a new child runs the
tests not yet run. Stops when the budget is spent (the rest recorded as not run). Prints one
line per test and a summary; writes the outcomes to --results (JSON lines).

As a pytest plugin (`-p gpu_tests`): writes "start" and each finished test's outcome to the
file named by $HORIZON_GPU_TEST_LOG as they happen (flushed), and, when pytest-timeout is not
installed, arms its own per-test watchdog ($HORIZON_GPU_TEST_TIMEOUT seconds) that records the
timeout, dumps the threads' stacks and ends the process (a kernel that never returns cannot be
interrupted from Python: only a new process goes on).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

_LOG_ENV = "HORIZON_GPU_TEST_LOG"
_TIMEOUT_ENV = "HORIZON_GPU_TEST_TIMEOUT"
TIMED_OUT_EXIT = 86


# ---------------------------------------------------------------- the plugin (child side)


def _log(event: dict) -> None:
    path = os.environ.get(_LOG_ENV)
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps(event) + "\n")
        f.flush()
        os.fsync(f.fileno())


class _Watchdog:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.timer = None

    def arm(self, nodeid: str) -> None:
        def fire():
            import faulthandler

            _log({"event": "timeout", "nodeid": nodeid, "seconds": self.seconds})
            sys.stderr.write(f"\n+++ gpu_tests: {nodeid} ran past {self.seconds:.0f} s: ending this pytest +++\n")
            faulthandler.dump_traceback(all_threads=True)
            sys.stderr.flush()
            os._exit(TIMED_OUT_EXIT)

        self.timer = threading.Timer(self.seconds, fire)
        self.timer.daemon = True
        self.timer.start()

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


_watchdog = None


def pytest_configure(config):
    global _watchdog
    seconds = float(os.environ.get(_TIMEOUT_ENV, "0") or 0)
    if seconds > 0 and not config.pluginmanager.hasplugin("timeout"):
        _watchdog = _Watchdog(seconds)


def pytest_runtest_logstart(nodeid, location):
    _log({"event": "start", "nodeid": nodeid, "t": time.time()})
    if _watchdog is not None:
        _watchdog.arm(nodeid)


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = report.outcome
        if outcome == "failed" and "Timeout" in str(report.longrepr or "")[:2000]:
            outcome = "timeout"  # pytest-timeout's signal method fails the test with a Timeout
        _log({"event": "result", "nodeid": report.nodeid, "outcome": outcome, "seconds": report.duration})


def pytest_runtest_logfinish(nodeid, location):
    if _watchdog is not None:
        _watchdog.disarm()
    _log({"event": "finish", "nodeid": nodeid})


# ---------------------------------------------------------------- the driver


def _collect(pytest_args: list) -> list:
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *pytest_args],
                       capture_output=True, text=True)
    ids = [line.strip() for line in r.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if r.returncode not in (0, 5) and not ids:
        sys.stdout.write(r.stdout[-3000:] + r.stderr[-3000:])
    return ids


def _read(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, required=True, help="seconds for all the tests")
    ap.add_argument("--per-test", type=float, required=True, help="seconds one test may take")
    ap.add_argument("--results", default="gpu-tests.jsonl", help="outcomes, one JSON line per test")
    ap.add_argument("--only-failed", default=None, help="a --results file of an earlier run: rerun what did not pass")
    ap.add_argument("--skips-fail", action="store_true",
                    help="a skipped test fails the run (on a GPU machine every GPU test must run: a skip "
                         "there means no CUDA, a missing kernel or a wrong build, never a pass)")
    ap.add_argument("pytest_args", nargs="*")
    args = ap.parse_args(argv)
    t0 = time.monotonic()

    ids = _collect(args.pytest_args)
    if args.only_failed and os.path.exists(args.only_failed):
        passed = {e["nodeid"] for e in _read(args.only_failed) if e.get("outcome") in ("passed", "skipped")}
        ids = [i for i in ids if i not in passed]
    print(f"gpu_tests: {len(ids)} tests, budget {args.budget:.0f} s, {args.per_test:.0f} s per test", flush=True)
    import tempfile

    log = os.path.join(tempfile.mkdtemp(prefix="gpu-tests-"), "events.jsonl")  # not in $OUT: 8 files come back
    if os.path.exists(args.results):
        os.remove(args.results)
    outcomes: dict = {}
    has_timeout_plugin = subprocess.run([sys.executable, "-c", "import pytest_timeout"],
                                        capture_output=True).returncode == 0
    remaining = list(ids)
    here = os.path.dirname(os.path.abspath(__file__))
    while remaining:
        left = args.budget - (time.monotonic() - t0)
        if left < min(args.per_test, 20):
            break
        env = dict(os.environ, **{_LOG_ENV: log, _TIMEOUT_ENV: str(args.per_test)})
        env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "gpu_tests", "-p", "no:cacheprovider", "-rfE"]
        if has_timeout_plugin:  # its thread method ends the process like our watchdog
            cmd += [f"--timeout={args.per_test:.0f}", "--timeout-method=thread"]
        try:
            r = subprocess.run(cmd + remaining, env=env, timeout=left)
            rc = r.returncode
        except subprocess.TimeoutExpired:
            rc = None
        events = _read(log)
        running = None
        for e in events:
            if e["event"] == "start":
                running = e["nodeid"]
            elif e["event"] == "result":
                outcomes[e["nodeid"]] = e["outcome"]
            elif e["event"] == "finish":
                running = None
            elif e["event"] == "timeout":
                outcomes[e["nodeid"]] = "timeout"
        if running is not None and running not in outcomes:
            # The child ended inside this test: pytest-timeout's thread method, our watchdog,
            # a crash, or the budget.
            outcomes[running] = "timeout" if rc != 0 else "error"
        remaining = [i for i in remaining if i not in outcomes]
        if rc is None or running is None:
            break  # budget spent, or the child finished (what it did not report did not run)
    for i in ids:
        outcomes.setdefault(i, "not run")
    with open(args.results, "w") as f:
        for i in ids:
            f.write(json.dumps({"nodeid": i, "outcome": outcomes[i]}) + "\n")
    counts: dict = {}
    for o in outcomes.values():
        counts[o] = counts.get(o, 0) + 1
    for i in ids:
        if outcomes[i] not in ("passed", "skipped"):
            print(f"  {outcomes[i]:8s} {i}")
    took = time.monotonic() - t0
    print("gpu_tests: " + ", ".join(f"{n} {o}" for o, n in sorted(counts.items())) + f" in {took:.0f} s", flush=True)
    ok = ("passed", "skipped") if not args.skips_fail else ("passed",)
    if args.skips_fail and counts.get("skipped"):
        print(f"gpu_tests: {counts['skipped']} of {len(ids)} tests skipped: fewer ran than the suite holds", flush=True)
    return 0 if all(o in ok for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
