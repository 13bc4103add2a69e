//! PyO3 bindings only: argument conversion, the panic guard and error mapping. Each
//! submodule registers the functions of one room of the crate.

mod foundation;
mod offload;
mod pipeline;
mod store;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

pyo3::create_exception!(
    _native,
    HorizonError,
    PyRuntimeError,
    "An error raised by Horizon's native core."
);

/// Runs `f`, turning a Rust panic into a `HorizonError` so a panic never crosses into Python
/// (PyO3's own PanicException derives from BaseException, which `except Exception` misses).
pub(crate) fn guard<T>(what: &str, f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(HorizonError::new_err(format!("internal error in {what}: {msg}")))
        }
    }
}

pub(crate) fn err(msg: impl Into<String>) -> PyErr {
    HorizonError::new_err(msg.into())
}

#[pymodule]
#[pyo3(name = "_native")]
fn native_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("HorizonError", m.py().get_type::<HorizonError>())?;
    m.add("__version__", crate::VERSION)?;
    foundation::register(m)?;
    store::register(m)?;
    pipeline::register(m)?;
    offload::register(m)?;
    Ok(())
}
