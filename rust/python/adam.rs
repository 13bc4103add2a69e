//! Bindings of CPU AdamW (`crate::adam`): the validated hyper-parameters (`AdamW`), the fused
//! step and the gradient reductions. Python hands over data pointers of tensors it has
//! already checked (dtype, device, contiguity, sizes; see horizon/optim.py); this layer
//! re-checks what would make the Rust side unsound (null or misaligned pointers, overlapping
//! outputs) and releases the GIL while the work runs.

use super::{err, guard};
use crate::adam::{self, AdamW, Field};
use crate::cpu::{pool, simd};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat};

/// `repr(x)` on one line, cut to a readable length (the value an error names).
fn shown(x: &Bound<'_, PyAny>) -> String {
    let r = x.repr().map(|r| r.to_string()).unwrap_or_else(|_| "<unprintable>".into());
    let r = r.split_whitespace().collect::<Vec<_>>().join(" ");
    match r.char_indices().nth(80) {
        Some((at, _)) => format!("{}...", &r[..at]),
        None => r,
    }
}

/// One hyper-parameter from Python: a real number (int, float, or anything with `__float__`
/// such as a numpy scalar or a one-element tensor; never a bool or a string) that meets its
/// field's rule (`Field::accepts`, in the core). The error is a one-line ValueError naming the
/// field and the value as Python shows it.
fn number(field: Field, x: &Bound<'_, PyAny>) -> PyResult<f64> {
    let refuse = || PyValueError::new_err(format!("{} must be {}, got {}", field.name(), field.rule(), shown(x)));
    // A bool converts to 1.0 / 0.0 (Python's and numpy's, `numpy.bool` / `numpy.bool_`,
    // alike): refused, as a slip.
    let numpy_bool = x.get_type().name().is_ok_and(|n| matches!(n.to_string().as_str(), "bool" | "bool_"));
    if x.is_instance_of::<PyBool>() || numpy_bool {
        return Err(refuse());
    }
    let v: f64 = x.extract().map_err(|_| refuse())?;
    if !field.accepts(v) {
        return Err(refuse());
    }
    Ok(v)
}

fn float_repr(py: Python<'_>, x: f64) -> String {
    PyFloat::new(py, x).repr().map(|r| r.to_string()).unwrap_or_else(|_| format!("{x:?}"))
}

/// AdamW's hyper-parameters, checked once when made (by the core's rule: `crate::adam::Field`)
/// and carried whole from Python to the Rust step: `AdamW(lr, beta1, beta2, eps, weight_decay)`. lr is the
/// instantaneous rate (finite, >= 0: a schedule may reach 0); beta1 and beta2 finite in
/// [0, 1); eps finite > 0; weight_decay finite >= 0. Immutable: `with_lr` makes a new one.
#[pyclass(name = "AdamW", module = "horizon._native", frozen)]
#[derive(Clone)]
pub(crate) struct PyAdamW {
    pub(crate) hyper: AdamW,
}

#[pymethods]
impl PyAdamW {
    #[new]
    #[pyo3(signature = (lr, beta1, beta2, eps, weight_decay))]
    fn new(
        lr: &Bound<'_, PyAny>,
        beta1: &Bound<'_, PyAny>,
        beta2: &Bound<'_, PyAny>,
        eps: &Bound<'_, PyAny>,
        weight_decay: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let v = [
            number(Field::Lr, lr)?,
            number(Field::Beta1, beta1)?,
            number(Field::Beta2, beta2)?,
            number(Field::Eps, eps)?,
            number(Field::WeightDecay, weight_decay)?,
        ];
        let hyper = AdamW::new(v[0], v[1], v[2], v[3], v[4]).map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(PyAdamW { hyper })
    }

    /// The same hyper-parameters with learning rate `lr` (checked like the constructor's).
    fn with_lr(&self, lr: &Bound<'_, PyAny>) -> PyResult<Self> {
        let lr = number(Field::Lr, lr)?;
        let hyper = self.hyper.with_lr(lr).map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(PyAdamW { hyper })
    }

    #[getter]
    fn lr(&self) -> f64 {
        self.hyper.lr()
    }

    #[getter]
    fn beta1(&self) -> f64 {
        self.hyper.beta1()
    }

    #[getter]
    fn beta2(&self) -> f64 {
        self.hyper.beta2()
    }

    /// `(beta1, beta2)`, as torch spells them.
    #[getter]
    fn betas(&self) -> (f64, f64) {
        (self.hyper.beta1(), self.hyper.beta2())
    }

    #[getter]
    fn eps(&self) -> f64 {
        self.hyper.eps()
    }

    #[getter]
    fn weight_decay(&self) -> f64 {
        self.hyper.weight_decay()
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let h = &self.hyper;
        format!(
            "AdamW(lr={}, beta1={}, beta2={}, eps={}, weight_decay={})",
            float_repr(py, h.lr()),
            float_repr(py, h.beta1()),
            float_repr(py, h.beta2()),
            float_repr(py, h.eps()),
            float_repr(py, h.weight_decay())
        )
    }

    /// Equal when every value is (another type: NotImplemented).
    fn __eq__(&self, other: PyRef<'_, Self>) -> bool {
        self.hyper == other.hyper
    }

    fn __hash__(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let h = &self.hyper;
        let mut s = std::collections::hash_map::DefaultHasher::new();
        // + 0.0 maps -0.0 to 0.0: values equal under == hash alike.
        for x in [h.lr(), h.beta1(), h.beta2(), h.eps(), h.weight_decay()] {
            (x + 0.0).to_bits().hash(&mut s);
        }
        s.finish()
    }

    /// Pickling and copying rebuild it through the constructor.
    fn __getnewargs__(&self) -> (f64, f64, f64, f64, f64) {
        let h = &self.hyper;
        (h.lr(), h.beta1(), h.beta2(), h.eps(), h.weight_decay())
    }
}

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

/// One fused AdamW step over `n` elements at the given addresses (`w_ptr` 0: no bf16 copy),
/// with the hyper-parameters `hyper`, as step number `step` (1-based), the gradient scaled by
/// `grad_scale`.
#[pyfunction]
#[pyo3(signature = (p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, n, *, hyper, step, grad_scale=1.0))]
#[allow(clippy::too_many_arguments)]
fn adamw_step_raw(
    py: Python<'_>,
    p_ptr: u64,
    g_ptr: u64,
    m_ptr: u64,
    v_ptr: u64,
    w_ptr: u64,
    n: usize,
    hyper: PyRef<'_, PyAdamW>,
    step: u64,
    grad_scale: f64,
) -> PyResult<()> {
    let hp = hyper.hyper;
    guard("adamw_step", || {
        if step < 1 {
            return Err(err(format!("adamw_step: step must be >= 1 (1-based), got {step}")));
        }
        if !grad_scale.is_finite() {
            return Err(err(format!("adamw_step: grad_scale must be finite, got {grad_scale}")));
        }
        if n == 0 {
            return Ok(());
        }
        check_step_buffers(p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, n)?;
        py.allow_threads(|| {
            // SAFETY: Python checked sizes and dtypes and keeps the tensors alive for the
            // call; the ranges are non-null, aligned and pairwise disjoint (checked above).
            unsafe {
                let p = std::slice::from_raw_parts_mut(p_ptr as *mut f32, n);
                let g = std::slice::from_raw_parts(g_ptr as *const f32, n);
                let m = std::slice::from_raw_parts_mut(m_ptr as *mut f32, n);
                let v = std::slice::from_raw_parts_mut(v_ptr as *mut f32, n);
                let w = (w_ptr != 0).then(|| std::slice::from_raw_parts_mut(w_ptr as *mut u16, n));
                adam::adamw_step(p, g, m, v, w, &hp, step, grad_scale);
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

/// The bandwidth roof of the step (benchmarks; only with the cargo feature `roof`): Adam's
/// loads and stores, no arithmetic, on the same pool as the step. Scribbles over p, m and v.
#[cfg(feature = "roof")]
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
                adam::roof::memory_roof_pass(pool::pool_for(n), p, g, m, v, w);
            }
        });
        Ok(())
    })
}

/// `(simd level name, threads of the global pool)` that the steps run with.
#[pyfunction]
fn adam_config() -> (String, usize) {
    (simd::detected().name().to_string(), pool::default_threads())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyAdamW>()?;
    m.add_function(wrap_pyfunction!(adamw_step_raw, m)?)?;
    m.add_function(wrap_pyfunction!(grad_sq_norm_raw, m)?)?;
    m.add_function(wrap_pyfunction!(all_finite_raw, m)?)?;
    #[cfg(feature = "roof")]
    m.add_function(wrap_pyfunction!(adam_memory_roof_raw, m)?)?;
    m.add_function(wrap_pyfunction!(adam_config, m)?)?;
    Ok(())
}
