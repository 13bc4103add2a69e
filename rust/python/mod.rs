//! PyO3 bindings only: argument conversion, the panic guard and error mapping. The files
//! mirror the core: `adam`, `memory` (with `dlpack`, its export to torch), `pipeline` and
//! `cuda` bind the modules of the same name; this file holds the module, the one error
//! adapter (`guard`, `err`) and the system report that spans them all.

mod adam;
mod cuda;
mod dlpack;
mod memory;
mod offload;
mod pipeline;

use crate::cpu::{simd, topology};
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

/// Everything `horizon doctor` reports from the native side, as one JSON object.
#[pyfunction]
fn system_info_json() -> PyResult<String> {
    guard("system_info_json", || {
        let (ram_total, ram_available) = topology::host_memory_bytes();
        let driver = crate::cuda::driver_available();
        let (gpus, gpu_error) = if driver {
            match crate::cuda::gpus() {
                Ok(g) => (g, None),
                Err(e) => (Vec::new(), Some(e.to_string())),
            }
        } else {
            (Vec::new(), None)
        };
        let simd = simd::detected();
        let v = serde_json::json!({
            "native_version": crate::VERSION,
            "simd": simd.name(),
            "simd_hardware": simd::hardware().name(),
            "numa_nodes": topology::numa_nodes(),
            "allowed_cpus": topology::allowed_cpus(),
            "host_memory_total_bytes": ram_total,
            "host_memory_available_bytes": ram_available,
            "cuda_driver_present": driver,
            "cuda_driver_version": crate::cuda::driver_version(),
            "gpus": gpus,
            "gpu_error": gpu_error,
            "kernel_build": crate::cuda::kernel_build_status(),
            "kernels": crate::cuda::embedded_kernels(),
        });
        Ok(v.to_string())
    })
}

/// Raises a Rust panic inside the guard: lets the tests show a panic becomes a HorizonError.
#[pyfunction]
fn _panic_for_test(message: String) -> PyResult<()> {
    guard("_panic_for_test", || panic!("{message}"))
}

#[pymodule]
#[pyo3(name = "_native")]
fn native_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("HorizonError", m.py().get_type::<HorizonError>())?;
    m.add("__version__", crate::VERSION)?;
    m.add_function(wrap_pyfunction!(system_info_json, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_test, m)?)?;
    adam::register(m)?;
    memory::register(m)?;
    pipeline::register(m)?;
    cuda::register(m)?;
    offload::register(m)?;
    Ok(())
}
