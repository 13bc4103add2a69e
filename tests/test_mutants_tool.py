"""scripts/mutants.py, the one-token mutation runner (docs/testing.md): which mutants it makes,
and that it refuses bad arguments in one line. (Running mutants is not part of the suite.)"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import mutants  # noqa: E402


def test_mutants_change_one_code_token_never_a_string_or_a_comment(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        'def f(a, b, *, c=0):\n'
        '    """a < b in a docstring"""\n'
        '    if a < b and not c:  # a <= b in a comment\n'
        '        return min(a, b) + 1\n'
        '    raise ValueError(f"{a} > {b}")\n'
        '    return "x < y"\n'
    )
    got = {(row, old, new) for row, _, old, new in mutants.candidates(f)}
    assert got == {
        (3, "<", "<="), (3, "and", "or"), (3, "not ", ""),
        (4, "min", "max"), (4, "+", "-"), (4, "1", "2"),
    }
    lines = f.read_text().splitlines(keepends=True)
    for c in mutants.candidates(f):
        text = mutants._mutate(lines, c)
        changed = [i + 1 for i, (x, y) in enumerate(zip(text.splitlines(), f.read_text().splitlines())) if x != y]
        assert changed == [c[0]]
        compile(text, "m", "exec")


def test_every_group_has_candidates_and_its_test_files_exist():
    for group, (modules, tests) in mutants.GROUPS.items():
        assert all((ROOT / t).is_file() for t in tests), group
        assert sum(len(mutants.candidates(ROOT / m)) for m in modules) > 20, group


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "mutants.py"), *args], capture_output=True,
                          text=True, timeout=120)


def test_list_and_bad_arguments():
    r = _run("--list", "--group", "optim", "--max", "5")
    assert r.returncode == 0 and r.stdout.strip().endswith("5 mutants")
    for bad, says in ((["--budget-min", "0"], "--budget-min must be positive"),
                      (["--only", "nonsense"], "--only takes FILE:LINE"),
                      (["--only", "src/horizon/optim.py:1", "--group", "optim"], "no mutant on")):
        r = _run(*bad)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------- the optional bench peer


def test_the_adamw_bench_skips_deepspeed_with_its_reason(monkeypatch):
    """benches/adam_vs_peers.py: DeepSpeed is an optional peer (requirements-peers.txt). Missing,
    or present with a CPU Adam op that does not build, its rows are skipped with the reason,
    never a crash (the README's DeepSpeed rows say how to produce them)."""
    import types

    monkeypatch.syspath_prepend(str(ROOT / "benches"))
    import adam_vs_peers as bench

    for name in ("deepspeed", "deepspeed.ops", "deepspeed.ops.adam"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails: not installed
    cls, why = bench.try_deepspeed()
    assert cls is None and ("ModuleNotFoundError" in why or "ImportError" in why), why

    class Unbuildable:
        def __init__(self, *a, **k):
            try:
                raise RuntimeError("Unable to JIT load the cpu_adam op due to ninja not being installed.")
            except RuntimeError as e:
                raise RuntimeError("DeepSpeedCPUAdam requires the cpu_adam op, which failed to build/load.") from e

    adam = types.ModuleType("deepspeed.ops.adam")
    adam.DeepSpeedCPUAdam = Unbuildable
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    monkeypatch.setitem(sys.modules, "deepspeed.ops", types.ModuleType("deepspeed.ops"))
    monkeypatch.setitem(sys.modules, "deepspeed.ops.adam", adam)
    cls, why = bench.try_deepspeed()
    assert cls is None and "failed to build/load" in why and "ninja not being installed" in why, why
