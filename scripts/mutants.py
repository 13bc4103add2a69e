#!/usr/bin/env python3
"""One-line mutation testing of the Python side (docs/testing.md): does the suite notice when
a comparison, a boolean, a constant, a min/max or an arithmetic operator of the engine, data,
optimizer or MoE code is changed?

Each mutant changes one token on one line (found with `tokenize`, so never inside a string or
a comment; a mutant that does not compile is dropped). It runs in a scratch copy of the
repository (the working tree is never touched), against the test files that cover its module,
first failure stops it. Outcomes:
  killed    a test failed (or the tests' process crashed)
  timeout   it ran past 3 x the module's baseline + 30 s (counted as killed: a hang is noticed)
  survived  every test passed: a blind spot, or an equivalent mutant (docs/testing.md lists the
            ones accepted, with the reason)

  python scripts/mutants.py                      # every group, 30 minutes
  python scripts/mutants.py --budget-min 10 --group data --seed 3
  python scripts/mutants.py --list --group optim # the candidate mutants, nothing run
  python scripts/mutants.py --only src/horizon/optim.py:57   # the mutants of one line

The order is a seeded shuffle, so a budget samples every module of the chosen groups; results
go to mutants.out/python.jsonl (one line per mutant, appended as it finishes) and a summary
of the survivors is printed at the end."""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize
from dataclasses import dataclass
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parent.parent

# group -> (modules, the test files that cover them)
GROUPS = {
    "engine": (
        ["src/horizon/engine/schedule.py", "src/horizon/engine/activations.py", "src/horizon/engine/state.py",
         "src/horizon/engine/ledger.py", "src/horizon/engine/pipeline.py", "src/horizon/engine/offload.py",
         "src/horizon/engine/config.py"],
        ["tests/test_engine.py", "tests/test_activation_budget.py", "tests/test_robustness.py",
         "tests/test_pipeline.py", "tests/test_disk_tier.py"],
    ),
    "distributed": (["src/horizon/engine/distributed.py", "src/horizon/distributed.py"],
                    ["tests/test_distributed.py"]),
    "data": (
        ["src/horizon/data/dataset.py", "src/horizon/data/packing.py", "src/horizon/data/render.py",
         "src/horizon/data/tokenizer.py", "src/horizon/data/sources.py", "src/horizon/data/cache.py",
         "src/horizon/data/config.py"],
        ["tests/test_data.py", "tests/test_chat_data.py", "tests/test_packing.py", "tests/test_data_formats.py",
         "tests/test_run_data.py", "tests/test_data_inspect.py"],
    ),
    "optim": (["src/horizon/optim.py"], ["tests/test_optim.py", "tests/test_engine.py"]),
    "moe": (["src/horizon/kernels/moe/reference.py", "src/horizon/kernels/moe/fused.py",
             "src/horizon/kernels/moe/__init__.py"], ["tests/test_moe.py", "tests/test_models.py"]),
}

# The crate's modules -> the pytest files that exercise them through the bindings. cargo
# test cannot see those tests, so `--rust-recheck` runs the mutants cargo-mutants found missed
# against them (the module rebuilt with the mutant).
RUST_TESTS = {
    "rust/adam/": ["tests/test_optim.py", "tests/test_store.py"],
    "rust/cpu/": ["tests/test_store.py", "tests/test_foundation.py", "tests/test_optim.py"],
    "rust/memory/": ["tests/test_store.py", "tests/test_foundation.py"],
    "rust/offload/": ["tests/test_disk_tier.py"],
    "rust/pipeline/": ["tests/test_pipeline.py", "tests/test_engine.py"],
}

# token -> what it becomes (one mutant per replacement)
OPS = {
    "<": ["<="], "<=": ["<"], ">": [">="], ">=": [">"], "==": ["!="], "!=": ["=="],
    "+": ["-"], "-": ["+"], "*": ["/"], "/": ["*"], "//": ["/"], "%": ["//"],
    "+=": ["-="], "-=": ["+="], "*=": ["/="], "/=": ["*="],
}
NAMES = {
    "and": ["or"], "or": ["and"], "True": ["False"], "False": ["True"],
    "min": ["max"], "max": ["min"], "ceil": ["floor"], "floor": ["ceil"],
    "break": ["continue"], "continue": ["break"],
}
SKIP_LINE_STARTS = ("def ", "class ", "@", "import ", "from ", "log.", "raise ", "assert ", "return f\"", "print(")


def candidates(path: pathlib.Path) -> list:
    """(line, col, original token, replacement) for every one-token mutation of the file."""
    src = path.read_text()
    lines = src.splitlines(keepends=True)
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        (row, col), text = tok.start, tok.string
        if tok.type not in (tokenize.OP, tokenize.NAME, tokenize.NUMBER):
            continue
        line = lines[row - 1]
        stripped = line.lstrip()
        if stripped.startswith(SKIP_LINE_STARTS) or "HorizonError(" in line or "log." in line:
            continue  # signatures, imports, messages: not behaviour the tests should pin
        if tok.type == tokenize.OP and text in OPS:
            if text in ("*", "**") and line[col + 1: col + 2] in (",", ")"):
                continue
            subs = OPS[text]
        elif tok.type == tokenize.NAME and text in NAMES:
            subs = NAMES[text]
        elif tok.type == tokenize.NAME and text == "not" and line[col + 3: col + 4] == " ":
            out.append((row, col, "not ", ""))
            continue
        elif tok.type == tokenize.NUMBER and text.isdigit() and int(text) in (0, 1, 2):
            subs = [str(int(text) + 1)] if text != "2" else ["1"]
        else:
            continue
        out.extend((row, col, text, s) for s in subs)
    return [c for c in out if _compiles(lines, c)]


def _mutate(lines: list, c) -> str:
    row, col, old, new = c
    line = lines[row - 1]
    assert line[col: col + len(old)] == old, (c, line)
    return "".join(lines[: row - 1]) + line[:col] + new + line[col + len(old):] + "".join(lines[row:])


def _compiles(lines, c) -> bool:
    try:
        compile(_mutate(lines, c), "<mutant>", "exec")
        return True
    except SyntaxError:
        return False


def _pytest(work: pathlib.Path, tests: list, timeout: float) -> tuple:
    """(status, seconds, first failure) of the tests in the scratch copy."""
    env = dict(os.environ, PYTHONPATH=str(work / "src"), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not gpu", *tests]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - t0, ""
    dt = time.monotonic() - t0
    if p.returncode == 0:
        return "survived", dt, ""
    failed = next((ln for ln in p.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))), "")
    return "killed", dt, failed or f"exit {p.returncode}: {p.stdout.strip().splitlines()[-1:] or p.stderr[-200:]}"


def _build_native(work: pathlib.Path) -> str:
    """Builds the scratch copy's crate as the Python module (no kernels, an incremental target
    dir kept under target/) into work/src/horizon; returns "" or why it did not build."""
    env = dict(os.environ, CARGO_TARGET_DIR=str(ROOT / "target" / "mutants-py"), HORIZON_NO_KERNELS="1")
    p = subprocess.run(["cargo", "build", "--release", "--lib", "--features", "python,pyo3/extension-module"],
                       cwd=work, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        return (p.stderr.strip().splitlines() or ["cargo build failed"])[-1]
    shutil.copy2(ROOT / "target" / "mutants-py" / "release" / "libhorizon_native.so",
                 work / "src" / "horizon" / "_native.abi3.so")
    return ""


@dataclass
class _Mutant:
    """One mutant for `_run`: `apply(work, target)` changes work/`file` (the path `target`) in
    place and builds what it needs, returning "" or why the mutant cannot run; `record` starts
    its JSON line; `detail` follows its label in the survivors' list."""

    file: str
    tests: list
    label: str
    apply: Callable[[pathlib.Path, pathlib.Path], str]
    record: dict
    detail: str = ""


def _run(work: pathlib.Path, mutants: list, *, budget_min: float, out: pathlib.Path, what: str,
         overhead_s: float = 0.0, prepare=None) -> int:
    """Runs `mutants` in the scratch copy `work` (each file restored after its mutant) against
    their tests, first checking that the unmutated tests pass (their time sets the mutants'
    limits: 3 x + 30 s); stops starting mutants when the next one's baseline (+ `overhead_s`)
    would end past the budget. `prepare(work)`, when given, runs before the baselines and after
    the last mutant ("" or why it failed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * budget_min
    counts = {"killed": 0, "timeout": 0, "unviable": 0, "survived": 0}
    survivors = []
    try:
        if prepare is not None:
            why = prepare(work)
            if why:
                print(f"mutants: the unmutated tree does not build ({why})", file=sys.stderr)
                return 2
        baseline = {}
        for m in mutants:  # the unmutated tests must pass, and set the mutants' limits
            key = tuple(m.tests)
            if key not in baseline:
                status, dt, why = _pytest(work, m.tests, timeout=3600)
                if status != "survived":
                    print(f"mutants: the unmutated {' '.join(m.tests)} do not pass ({why}): nothing to learn",
                          file=sys.stderr)
                    return 2
                baseline[key] = dt
                print(f"baseline {' '.join(m.tests)}: {dt:.0f} s", flush=True)
        for i, m in enumerate(mutants):
            base = baseline[tuple(m.tests)]
            if time.monotonic() + base + overhead_s > deadline:
                break
            target = work / m.file
            original = target.read_text()
            t0 = time.monotonic()
            try:
                why = m.apply(work, target)
                status = "unviable" if why else None
                if not why:
                    status, _, why = _pytest(work, m.tests, 3 * base + 30)
            finally:
                target.write_text(original)
            dt = time.monotonic() - t0
            counts[status] += 1
            with out.open("a") as f:
                f.write(json.dumps(dict(m.record, status=status, seconds=round(dt, 1), failed=why)) + "\n")
            print(f"[{i + 1}/{len(mutants)}] {status:8s} {m.label}  ({dt:.0f} s)", flush=True)
            if status == "survived":
                survivors.append(m)
        if prepare is not None:
            prepare(work)  # leave what it builds made from the unmutated source
    finally:
        shutil.rmtree(work, ignore_errors=True)
    unviable = f"{counts['unviable']} unviable, " if counts["unviable"] else ""
    print(f"\n{sum(counts.values())} of {len(mutants)} {what}: {counts['killed']} killed, {counts['timeout']} timed out, "
          f"{unviable}{counts['survived']} survived  (records: {out})")
    for m in survivors:
        print(f"  survived {m.label}" + (f"   | {m.detail}" if m.detail else ""))
    return 0


def _patch_and_build(diff: pathlib.Path):
    def apply(work: pathlib.Path, target: pathlib.Path) -> str:
        with open(diff) as f:
            p = subprocess.run(["patch", "-s", str(target)], stdin=f, capture_output=True, text=True)
        return p.stdout.strip() if p.returncode else _build_native(work)
    return apply


def rust_recheck(a) -> int:
    """The mutants cargo-mutants reported missed (outcomes.json of its output directory), each
    built into the Python module and run against the pytest files of its module."""
    outcomes = json.loads((pathlib.Path(a.rust_recheck) / "outcomes.json").read_text())["outcomes"]
    missed = []
    for o in outcomes:
        m = o["scenario"].get("Mutant") if isinstance(o["scenario"], dict) else None
        if m and o["summary"] == "MissedMutant":
            tests = next((t for prefix, t in RUST_TESTS.items() if m["file"].startswith(prefix)), None)
            if tests:
                diff = pathlib.Path(a.rust_recheck) / o["diff_path"]
                missed.append(_Mutant(m["file"], tests, m["name"], _patch_and_build(diff),
                                      dict(group="rust", mutant=m["name"], file=m["file"], tests=tests)))
    if not missed:
        print("mutants: no missed Rust mutant of a module the Python tests exercise")
        return 0
    return _run(_scratch(), missed, budget_min=a.budget_min, out=pathlib.Path(a.out),
                what="missed Rust mutants rechecked with pytest", overhead_s=60, prepare=_build_native)


def _scratch() -> pathlib.Path:
    work = pathlib.Path(tempfile.mkdtemp(prefix="horizon-mutants-"))
    for d in ("src", "tests", "cuda", "scripts", "benches", "docs", "rust"):
        if (ROOT / d).exists():
            shutil.copytree(ROOT / d, work / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for f in ("pyproject.toml", "README.md", "Makefile", "Cargo.toml", "Cargo.lock"):
        if (ROOT / f).exists():
            shutil.copy2(ROOT / f, work / f)
    return work


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--group", action="append", choices=sorted(GROUPS), help="default: every group")
    ap.add_argument("--budget-min", type=float, default=30.0, help="stop starting mutants after this (default 30)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max", type=int, default=None, help="at most this many mutants")
    ap.add_argument("--only", action="append", default=[], help="FILE:LINE: the mutants of that line only")
    ap.add_argument("--list", action="store_true", help="print the candidates and stop")
    ap.add_argument("--out", default=str(ROOT / "mutants.out" / "python.jsonl"))
    ap.add_argument("--rust-recheck", metavar="DIR",
                    help="cargo-mutants' output directory: run the mutants it found missed against pytest")
    a = ap.parse_args(argv)
    if a.budget_min <= 0:
        ap.error(f"--budget-min must be positive, got {a.budget_min}")
    if a.rust_recheck:
        if not (pathlib.Path(a.rust_recheck) / "outcomes.json").is_file():
            ap.error(f"--rust-recheck: no outcomes.json in {a.rust_recheck} (run cargo mutants first)")
        return rust_recheck(a)

    groups = a.group or list(GROUPS)
    pool = []  # (group, module, candidate)
    for g in groups:
        mods, _ = GROUPS[g]
        for m in mods:
            pool.extend((g, m, c) for c in candidates(ROOT / m))
    if a.only:
        want = set()
        for o in a.only:
            f, _, ln = o.rpartition(":")
            if not f or not ln.isdigit():
                ap.error(f"--only takes FILE:LINE, got {o!r}")
            want.add((f, int(ln)))
        pool = [p for p in pool if (p[1], p[2][0]) in want]
        if not pool:
            ap.error(f"no mutant on {', '.join(a.only)} in the groups {', '.join(groups)}")
    random.Random(a.seed).shuffle(pool)
    if a.max is not None:
        pool = pool[: a.max]
    if a.list:
        for g, m, (row, col, old, new) in pool:
            print(f"{m}:{row}:{col + 1}: {old!r} -> {new!r}  [{g}]")
        print(f"{len(pool)} mutants")
        return 0

    sources = {m: (ROOT / m).read_text().splitlines(keepends=True) for m in {m for _, m, _ in pool}}
    mutants = []
    for g, m, c in pool:
        row, col, old, new = c
        lines = sources[m]

        def apply(work, target, lines=lines, c=c) -> str:
            target.write_text(_mutate(lines, c))
            return ""

        text = lines[row - 1].strip()
        mutants.append(_Mutant(m, GROUPS[g][1], f"{m}:{row}: {old!r} -> {new!r}", apply,
                               dict(group=g, file=m, line=row, col=col + 1, old=old, new=new, text=text), text))
    return _run(_scratch(), mutants, budget_min=a.budget_min, out=pathlib.Path(a.out), what="mutants run")


if __name__ == "__main__":
    sys.exit(main())
