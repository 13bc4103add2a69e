//! Bindings of CPU AdamW and the gradient reductions. Python hands over data pointers of
//! tensors it has already checked (dtype, device, contiguity, sizes; see horizon/optim.py);
//! this layer re-checks what would make the Rust side unsound (null or misaligned pointers,
//! overlapping outputs) and releases the GIL while the work runs.

use super::super::{err, guard};
use crate::adam::{self, AdamParams};
use pyo3::prelude::*;

fn range(name: &str, ptr: u64, n: usize, elem: usize) -> PyResult<(u64, u64)> {
    if ptr == 0 {
        return Err(err(format!("{name}: null data pointer")));
    }
    if !ptr.is_multiple_of(elem as u64) {
        return Err(err(format!("{name}: data pointer {ptr:#x} is not {elem}-byte aligned")));
    }
    let bytes = (n as u64).checked_mul(elem as u64).ok_or_else(|| err(format!("{name}: size overflows")))?;
    Ok((ptr, ptr.checked_add(bytes).ok_or_else(|| err(format!("{name}: range overflows")))?))
}

fn overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Checks the buffers of one step: non-null, aligned, pairwise disjoint.
fn check_step_buffers(p: u64, g: u64, m: u64, v: u64, w: u64, n: usize) -> PyResult<()> {
    let mut named = vec![
        ("param", range("param", p, n, 4)?),
        ("grad", range("grad", g, n, 4)?),
        ("exp_avg", range("exp_avg", m, n, 4)?),
        ("exp_avg_sq", range("exp_avg_sq", v, n, 4)?),
    ];
    if w != 0 {
        named.push(("bf16_out", range("bf16_out", w, n, 2)?));
    }
    for i in 0..named.len() {
        for j in i + 1..named.len() {
            if overlap(named[i].1, named[j].1) {
                return Err(err(format!("{} and {} overlap in memory; they must be distinct buffers", named[i].0, named[j].0)));
            }
        }
    }
    Ok(())
}

/// One fused AdamW step over `n` elements at the given addresses (`w_ptr` 0: no bf16 copy).
#[pyfunction]
#[pyo3(signature = (p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, n, *, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0))]
#[allow(clippy::too_many_arguments)]
fn adamw_step_raw(
    py: Python<'_>,
    p_ptr: u64,
    g_ptr: u64,
    m_ptr: u64,
    v_ptr: u64,
    w_ptr: u64,
    n: usize,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    step: u64,
    grad_scale: f64,
) -> PyResult<()> {
    guard("adamw_step", || {
        if step < 1 {
            return Err(err(format!("adamw_step: step must be >= 1 (1-based), got {step}")));
        }
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(err(format!("adamw_step: lr must be finite and >= 0, got {lr}")));
        }
        if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
            return Err(err(format!("adamw_step: betas must be in [0, 1), got ({beta1}, {beta2})")));
        }
        if !(eps.is_finite() && eps >= 0.0 && weight_decay.is_finite() && weight_decay >= 0.0 && grad_scale.is_finite()) {
            return Err(err(format!(
                "adamw_step: eps ({eps}) and weight_decay ({weight_decay}) must be finite and >= 0, grad_scale ({grad_scale}) finite"
            )));
        }
        if n == 0 {
            return Ok(());
        }
        check_step_buffers(p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, n)?;
        let hp = AdamParams { lr, beta1, beta2, eps, weight_decay, step, grad_scale };
        py.allow_threads(|| {
            // SAFETY: Python checked sizes and dtypes and keeps the tensors alive for the
            // call; the ranges are non-null, aligned and pairwise disjoint (checked above).
            unsafe {
                let p = std::slice::from_raw_parts_mut(p_ptr as *mut f32, n);
                let g = std::slice::from_raw_parts(g_ptr as *const f32, n);
                let m = std::slice::from_raw_parts_mut(m_ptr as *mut f32, n);
                let v = std::slice::from_raw_parts_mut(v_ptr as *mut f32, n);
                let w = (w_ptr != 0).then(|| std::slice::from_raw_parts_mut(w_ptr as *mut u16, n));
                adam::adamw_step(p, g, m, v, w, &hp);
            }
        });
        Ok(())
    })
}

/// Sum of squares of `n` fp32 values (f64 accumulation, deterministic order).
#[pyfunction]
fn grad_sq_norm_raw(py: Python<'_>, ptr: u64, n: usize) -> PyResult<f64> {
    guard("grad_sq_norm", || {
        if n == 0 {
            return Ok(0.0);
        }
        range("tensor", ptr, n, 4)?;
        Ok(py.allow_threads(move || {
            // SAFETY: Python keeps the tensor alive for the call and checked its size.
            let g = unsafe { std::slice::from_raw_parts(ptr as *const f32, n) };
            adam::grad_sq_norm(g)
        }))
    })
}

/// Whether `n` fp32 values are all finite.
#[pyfunction]
fn all_finite_raw(py: Python<'_>, ptr: u64, n: usize) -> PyResult<bool> {
    guard("all_finite", || {
        if n == 0 {
            return Ok(true);
        }
        range("tensor", ptr, n, 4)?;
        Ok(py.allow_threads(move || {
            // SAFETY: as in grad_sq_norm_raw.
            let g = unsafe { std::slice::from_raw_parts(ptr as *const f32, n) };
            adam::all_finite(g)
        }))
    })
}

/// The bandwidth roof of the step (benchmarks): Adam's loads and stores, no arithmetic, on
/// the same pool as the step. Scribbles over p, m and v.
#[pyfunction]
fn adam_memory_roof_raw(py: Python<'_>, p_ptr: u64, g_ptr: u64, m_ptr: u64, v_ptr: u64, w_ptr: u64, n: usize) -> PyResult<()> {
    guard("adam_memory_roof", || {
        if n == 0 {
            return Ok(());
        }
        check_step_buffers(p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, n)?;
        py.allow_threads(|| {
            // SAFETY: as in adamw_step_raw.
            unsafe {
                let p = std::slice::from_raw_parts_mut(p_ptr as *mut f32, n);
                let g = std::slice::from_raw_parts(g_ptr as *const f32, n);
                let m = std::slice::from_raw_parts_mut(m_ptr as *mut f32, n);
                let v = std::slice::from_raw_parts_mut(v_ptr as *mut f32, n);
                let w = (w_ptr != 0).then(|| std::slice::from_raw_parts_mut(w_ptr as *mut u16, n));
                adam::memory_roof_pass(adam::pool_for(n), p, g, m, v, w);
            }
        });
        Ok(())
    })
}

/// `(simd level name, threads of the global pool)` that the steps run with.
#[pyfunction]
fn adam_config() -> (String, usize) {
    (adam::simd::detected().name().to_string(), adam::pool::default_threads())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(adamw_step_raw, m)?)?;
    m.add_function(wrap_pyfunction!(grad_sq_norm_raw, m)?)?;
    m.add_function(wrap_pyfunction!(all_finite_raw, m)?)?;
    m.add_function(wrap_pyfunction!(adam_memory_roof_raw, m)?)?;
    m.add_function(wrap_pyfunction!(adam_config, m)?)?;
    Ok(())
}
