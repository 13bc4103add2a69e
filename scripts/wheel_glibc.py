"""Checks a wheel's platform tag against the glibc its native module really needs: the newest
GLIBC_2.x symbol version the module's ELF asks for. maturin tags the wheel from those symbols
(manylinux_2_X); this checks the tag independently, and with --host also against this
machine's glibc, so an image with an older glibc refuses the wheel with a clear message
instead of a failed import ("version `GLIBC_2.x' not found").

    python scripts/wheel_glibc.py WHEEL [--host]
Exit 0 when the tag covers the need (and, with --host, this glibc meets it), else 1."""

from __future__ import annotations

import os
import re
import sys
import zipfile

_LEGACY = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def needed_glibc(elf: bytes):
    """The newest GLIBC_2.x version the module's symbol versions name, or None."""
    found = {tuple(int(p) for p in v.split(b".")) for v in re.findall(rb"GLIBC_(2\.\d+(?:\.\d+)?)\x00", elf)}
    return max(found) if found else None


def tagged_glibc(wheel_name: str):
    """The glibc the wheel's platform tag promises to need at most, or None (an untagged
    linux_* wheel promises nothing)."""
    m = re.search(r"manylinux_(\d+)_(\d+)_", wheel_name)
    if m:
        return int(m.group(1)), int(m.group(2))
    for tag, v in _LEGACY.items():
        if f"{tag}_" in wheel_name:
            return v
    return None


def host_glibc():
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (ValueError, OSError, AttributeError):
        return None
    return tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else None


def fmt(v) -> str:
    return "none" if v is None else ".".join(str(p) for p in v)


def check(wheel: str, host: bool = False) -> list:
    """Problems found (empty: fine); prints what it read."""
    with zipfile.ZipFile(wheel) as z:
        modules = [n for n in z.namelist() if n.endswith(".so") or ".so." in n]
        need = max((needed_glibc(z.read(n)) or (0,) for n in modules), default=(0,))
    need = None if need == (0,) else need
    tag = tagged_glibc(os.path.basename(wheel))
    print(f"wheel {os.path.basename(wheel)}: native code needs glibc {fmt(need)}, tag says {fmt(tag)}")
    problems = []
    if need is not None and (tag is None or tag < need):
        problems.append(f"the wheel's tag ({fmt(tag)}) does not cover the glibc {fmt(need)} its native module needs: "
                        "build it with maturin's manylinux auditing (maturin build --compatibility manylinux_2_"
                        f"{need[1]}, or --zig for an older target)")
    if host:
        have = host_glibc()
        print(f"this machine: glibc {fmt(have)}")
        if need is not None and have is not None and have < need:
            problems.append(f"this machine has glibc {fmt(have)}, the wheel needs {fmt(need)}: build the wheel on (or "
                            f"for, with maturin --zig) a system with glibc <= {fmt(have)}")
    return problems


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    host = "--host" in args
    wheels = [a for a in args if a != "--host"]
    if not wheels:
        print(__doc__)
        return 2
    problems = [p for w in wheels for p in check(w, host)]
    for p in problems:
        print(f"wheel_glibc: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
