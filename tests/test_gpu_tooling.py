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
