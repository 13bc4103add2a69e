//! Bindings of the CUDA side (`crate::cuda`): whether kernels and a driver exist, the kernel
//! launcher and the occupancy query.

use super::{err, guard};
use crate::cuda::{self, KernelArg};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

#[pyfunction]
fn has_kernels() -> bool {
    !cuda::fatbin().is_empty()
}

#[pyfunction]
fn cuda_driver_present() -> bool {
    cuda::driver_available()
}

fn dims(t: &Bound<'_, PyAny>, what: &str) -> PyResult<(u32, u32, u32)> {
    let v: Vec<u32> = t.extract().map_err(|_| err(format!("{what} must be a sequence of 1-3 non-negative ints")))?;
    match v.as_slice() {
        [x] => Ok((*x, 1, 1)),
        [x, y] => Ok((*x, *y, 1)),
        [x, y, z] => Ok((*x, *y, *z)),
        _ => Err(err(format!("{what} must have 1 to 3 entries, got {}", v.len()))),
    }
}

/// Launches kernel `name` of the embedded fatbin on the raw CUDA stream `stream`.
/// `args` is a sequence of `(kind, value)` with kind one of "ptr", "i32", "i64", "u32", "f32".
/// Asynchronous: returns once the launch is queued. `cooperative`: `cuLaunchCooperativeKernel`
/// (all blocks resident at once; a grid too large for that is halved until it fits).
#[pyfunction]
#[pyo3(signature = (name, grid, block, shared_mem, stream, device, args, cooperative=false))]
#[allow(clippy::too_many_arguments)]
fn launch(
    name: &str,
    grid: &Bound<'_, PyAny>,
    block: &Bound<'_, PyAny>,
    shared_mem: u32,
    stream: u64,
    device: i32,
    args: &Bound<'_, PyAny>,
    cooperative: bool,
) -> PyResult<()> {
    let grid = dims(grid, "grid")?;
    let block = dims(block, "block")?;
    let mut kargs = Vec::new();
    for (i, item) in args.try_iter()?.enumerate() {
        let item = item?;
        let t = item.downcast::<PyTuple>().map_err(|_| err(format!("kernel argument {i} must be a (kind, value) tuple")))?;
        let kind: String = t.get_item(0)?.extract()?;
        let val = t.get_item(1)?;
        let bad = |_e: PyErr| err(format!("kernel argument {i}: value does not fit kind {kind:?}"));
        kargs.push(match kind.as_str() {
            "ptr" => KernelArg::Ptr(val.extract().map_err(bad)?),
            "i32" => KernelArg::I32(val.extract().map_err(bad)?),
            "i64" => KernelArg::I64(val.extract().map_err(bad)?),
            "u32" => KernelArg::U32(val.extract().map_err(bad)?),
            "f32" => KernelArg::F32(val.extract().map_err(bad)?),
            other => return Err(err(format!("kernel argument {i}: unknown kind {other:?}"))),
        });
    }
    guard("launch", || {
        if cooperative {
            cuda::launch_cooperative(name, grid, block, shared_mem, stream, device, &kargs).map(|_| ())
        } else {
            cuda::launch(name, grid, block, shared_mem, stream, device, &kargs)
        }
        .map_err(|e| err(e.to_string()))
    })
}

/// {kernel name: launches the driver accepted} since the process started.
#[pyfunction]
fn kernel_launch_counts() -> std::collections::HashMap<String, u64> {
    cuda::launch_counts().into_iter().collect()
}

/// Blocks of kernel `name` that fit on one SM at once (for sizing persistent grids).
#[pyfunction]
#[pyo3(signature = (name, block_threads, shared_mem, device=0))]
fn max_active_blocks_per_sm(name: &str, block_threads: i32, shared_mem: usize, device: i32) -> PyResult<i32> {
    guard("max_active_blocks_per_sm", || {
        cuda::max_active_blocks_per_sm(name, block_threads, shared_mem, device).map_err(|e| err(e.to_string()))
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(has_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_driver_present, m)?)?;
    m.add_function(wrap_pyfunction!(launch, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_launch_counts, m)?)?;
    m.add_function(wrap_pyfunction!(max_active_blocks_per_sm, m)?)?;
    Ok(())
}
