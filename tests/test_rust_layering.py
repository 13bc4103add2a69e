"""The Rust crate's module layering, read from the sources (no build needed): every
`crate::...` path (in `use` items, grouped `use crate::{a, b::c}` included, and inline
`crate::x::f()` calls) and every `super::` path that climbs out of its top-level module names a
top-level module; a module may only name modules of lower layers, and the top-level modules
form no cycle."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

RUST = Path(__file__).resolve().parents[1] / "rust"

# Lowest first: each module may use only the modules before it.
LAYERS = ["cpu", "cuda", "memory", "adam", "pipeline", "offload", "python"]

_COMMENT_OR_TEXT = re.compile(
    r'//[^\n]*|/\*.*?\*/|b?r(#*)".*?"\1|b?"(?:\\.|[^"\\])*"|b?\'(?:\\.|[^\\\'])\'',
    re.S,
)
_TOKEN = re.compile(r"\bmod\s+(\w+)\s*\{|\{|\}|\b(crate|super|self)\s*::")


def _strip(src: str) -> str:
    """Comments, string and char literals blanked out (lengths kept), so `crate::` in a doc
    comment or a message is not taken for a path."""
    return _COMMENT_OR_TEXT.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), src)


def _module_path(path: Path) -> list[str]:
    """rust/adam/kernels.rs -> ["adam", "kernels"]; rust/adam/mod.rs -> ["adam"]; lib.rs -> []."""
    rel = path.relative_to(RUST).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return parts


def _path_segments(text: str, at: int) -> list[list[str]]:
    """The module paths a path starting at `at` (just after `crate::`) names: one for
    `a::b::c`, one per item of a group `{a::b, c::{d, e}}` (first segments are what counts)."""
    rest = text[at:].lstrip()
    if rest.startswith("{"):
        depth, items, cur = 0, [], ""
        for ch in rest:
            if ch == "{":
                depth += 1
                if depth == 1:
                    continue
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    items.append(cur)
                    break
            if ch == "," and depth == 1:
                items.append(cur)
                cur = ""
            else:
                cur += ch
        return [[s for s in re.split(r"\s*::\s*", item.strip()) if s] for item in items if item.strip()]
    m = re.match(r"\w+(?:\s*::\s*\w+)*", rest)
    return [re.split(r"\s*::\s*", m.group(0))] if m else []


def references(files: dict[str, str]) -> dict[str, set[str]]:
    """top-level module -> the other top-level modules its files name. `files` maps a path
    relative to rust/ to the file's text (so a test can hand in an edited copy)."""
    top_level = {_module_path(RUST / p)[0] for p in files if _module_path(RUST / p)}
    deps: dict[str, set[str]] = {m: set() for m in top_level}
    for rel, src in files.items():
        mod_path = _module_path(RUST / rel)
        if not mod_path:
            continue  # lib.rs declares the modules
        text = _strip(src)
        inline: list[tuple[str, int]] = []  # (name, depth) of inline `mod x { ... }` blocks
        depth = 0
        for tok in _TOKEN.finditer(text):
            if tok.group(1):  # `mod name {`
                depth += 1
                inline.append((tok.group(1), depth))
                continue
            if tok.group(0) == "{":
                depth += 1
                continue
            if tok.group(0) == "}":
                if inline and inline[-1][1] == depth:
                    inline.pop()
                depth -= 1
                continue
            kind = tok.group(2)
            if kind == "self":
                continue
            here = mod_path + [name for name, _ in inline]
            at = tok.end()
            if kind == "super":
                # climb: super::super::x from here
                up = 1
                while True:
                    m = re.match(r"\s*super\s*::", text[at:])
                    if not m:
                        break
                    up += 1
                    at += m.end()
                base = here[: len(here) - up] if up <= len(here) else None
                if base is None:
                    raise AssertionError(f"rust/{rel}: a super:: path climbs above the crate root")
                if base:  # still inside a top-level module: its own business
                    if base[0] != mod_path[0]:
                        deps[mod_path[0]].add(base[0])
                    continue
            for segs in _path_segments(text, at):
                name = segs[0] if segs else ""
                if name in top_level and name != mod_path[0]:
                    deps[mod_path[0]].add(name)
    return deps


def _sources() -> dict[str, str]:
    files = {str(p.relative_to(RUST)): p.read_text() for p in sorted(RUST.rglob("*.rs"))}
    files.pop("build.rs", None)  # the build script is not part of the crate
    return files


def layering_errors(deps: dict[str, set[str]]) -> list[str]:
    errors = []
    for mod, used in sorted(deps.items()):
        for dep in sorted(used):
            if LAYERS.index(dep) >= LAYERS.index(mod):
                errors.append(f"rust/{mod} uses crate::{dep}, a module of the same or a higher layer ({LAYERS})")
    return errors


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(deps.get(m, ())):
            if state.get(d) == "open":
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(deps):
        if m not in state:
            visit(m, [m])
    return found


def test_every_top_level_module_has_a_layer():
    lib = _strip((RUST / "lib.rs").read_text())
    declared = set(re.findall(r"\bmod\s+(\w+)\s*;", lib))
    on_disk = {_module_path(RUST / p)[0] for p in _sources() if _module_path(RUST / p)}
    assert declared == on_disk, f"lib.rs declares {sorted(declared)}, rust/ holds {sorted(on_disk)}"
    assert declared == set(LAYERS), f"place every module in LAYERS: {sorted(declared ^ set(LAYERS))}"


def test_no_module_uses_a_higher_layer():
    deps = references(_sources())
    assert layering_errors(deps) == []
    # The layering the crate is built on, seen by the parser (so it cannot pass by reading nothing).
    assert "cpu" in deps["memory"] and "cpu" in deps["adam"] and "adam" in deps["pipeline"]
    assert {"adam", "memory", "pipeline", "cuda", "cpu"} <= deps["python"]
    assert deps["cpu"] == set()


def test_top_level_modules_form_no_cycle():
    assert cycles(references(_sources())) == []


@pytest.mark.parametrize(
    "file, line",
    [
        ("memory/slab.rs", "use crate::adam;"),
        ("memory/slab.rs", "use crate::{cpu::pool, adam::AdamW};"),
        ("memory/arena.rs", "fn f() { let _ = crate::pipeline::SlotRing::new(1); }"),
        ("cpu/pool.rs", "use crate::memory::HostRegion;"),
        ("adam/kernels.rs", "mod inner { use super::super::super::pipeline::Lane; }"),
    ],
)
def test_the_check_catches_an_upward_use(file, line):
    files = _sources()
    files[file] = files[file] + "\n" + line + "\n"
    assert layering_errors(references(files)), f"{line!r} in rust/{file} was not caught"


def test_the_check_catches_a_cycle_and_ignores_comments_and_strings():
    files = _sources()
    files["cpu/pool.rs"] += "\nuse crate::adam::AdamW;\n"
    assert any("cpu" in c and "adam" in c for c in cycles(references(files)))
    files = _sources()
    files["memory/slab.rs"] += '\n// use crate::adam;\nconst S: &str = "crate::pipeline::Lane";\n/* crate::adam */\n'
    assert layering_errors(references(files)) == []
