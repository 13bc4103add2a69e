//! Bindings of host memory (`crate::memory`): host regions and layer slabs, exported to torch
//! as DLPack capsules (see `dlpack`), and where their pages landed.

use super::dlpack::export;
use super::{err, guard};
use crate::memory::{self, HostRegion, LayerSlab, Part, RegionOptions};
use pyo3::prelude::*;
use std::sync::Arc;

fn placement_json(r: &HostRegion) -> String {
    serde_json::to_string(&r.placement()).unwrap_or_default()
}

fn region_options(numa_node: Option<i64>, huge_pages: bool) -> PyResult<RegionOptions> {
    let numa_node = match numa_node {
        None => None,
        Some(n) if (0..=u32::MAX as i64).contains(&n) => Some(n as u32),
        Some(n) => return Err(err(format!("numa_node must be a non-negative node id, got {n}"))),
    };
    Ok(RegionOptions { numa_node, huge_pages, prefault: true })
}

/// One mapping of host memory (page-aligned, NUMA-placed, optionally page-locked).
#[pyclass(module = "horizon._native", name = "HostRegion", frozen)]
struct PyHostRegion {
    region: Arc<HostRegion>,
}

#[pymethods]
impl PyHostRegion {
    #[new]
    #[pyo3(signature = (nbytes, numa_node=None, huge_pages=true))]
    fn new(py: Python<'_>, nbytes: usize, numa_node: Option<i64>, huge_pages: bool) -> PyResult<Self> {
        let opts = region_options(numa_node, huge_pages)?;
        let r = py.allow_threads(|| guard("HostRegion", || HostRegion::map(nbytes, &opts).map_err(|e| err(e.0))))?;
        Ok(PyHostRegion { region: Arc::new(r) })
    }

    /// Page-locks `[offset, offset+nbytes)`; returns False (and records why in the
    /// placement's pin_note) when it cannot, e.g. without a CUDA driver.
    fn pin(&self, py: Python<'_>, offset: usize, nbytes: usize) -> PyResult<bool> {
        let r = Arc::clone(&self.region);
        py.allow_threads(|| guard("HostRegion.pin", || Ok(r.pin(offset, nbytes).is_ok())))
    }

    fn dlpack(&self, py: Python<'_>, offset: usize, numel: usize, dtype: &str) -> PyResult<PyObject> {
        guard("HostRegion.dlpack", || export(py, &self.region, offset, numel, dtype))
    }

    fn placement_json(&self) -> String {
        placement_json(&self.region)
    }

    #[getter]
    fn address(&self) -> usize {
        self.region.as_ptr() as usize
    }

    #[getter]
    fn nbytes(&self) -> usize {
        self.region.len()
    }
}

/// One layer's host state (see `memory::slab`).
#[pyclass(module = "horizon._native", name = "LayerSlab", frozen)]
struct PyLayerSlab {
    slab: LayerSlab,
}

fn part(name: &str) -> PyResult<Part> {
    Part::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = Part::ALL.iter().map(|p| p.name()).collect();
        err(format!("unknown slab part {name:?} (parts: {names:?})"))
    })
}

#[pymethods]
impl PyLayerSlab {
    #[new]
    #[pyo3(signature = (numel, with_grad=false, numa_node=None, pin=true, huge_pages=true))]
    fn new(py: Python<'_>, numel: usize, with_grad: bool, numa_node: Option<i64>, pin: bool, huge_pages: bool) -> PyResult<Self> {
        let opts = region_options(numa_node, huge_pages)?;
        let slab = py.allow_threads(|| {
            guard("LayerSlab", || LayerSlab::new(numel, with_grad, &opts, pin).map_err(|e| err(e.0)))
        })?;
        Ok(PyLayerSlab { slab })
    }

    /// A capsule viewing one part ("master", "exp_avg", "exp_avg_sq", "grad", "weights_bf16").
    fn dlpack(&self, py: Python<'_>, name: &str) -> PyResult<PyObject> {
        let p = part(name)?;
        let offset = self.slab.offset(p).ok_or_else(|| err(format!("this slab has no {name:?} (made without with_grad)")))?;
        let dtype = if p == Part::WeightsBf16 { "bfloat16" } else { "float32" };
        guard("LayerSlab.dlpack", || export(py, self.slab.region(), offset, self.slab.numel(), dtype))
    }

    /// Byte offset of a part inside the mapping; None for an absent gradient.
    fn offset(&self, name: &str) -> PyResult<Option<usize>> {
        Ok(self.slab.offset(part(name)?))
    }

    fn placement_json(&self) -> String {
        placement_json(self.slab.region())
    }

    /// Rewrites the bf16 compute copy from the fp32 master (round to nearest even), e.g. after
    /// the master was loaded from a checkpoint. Runs without the GIL.
    fn sync_weights_bf16(&self, py: Python<'_>) -> PyResult<()> {
        py.allow_threads(|| guard("LayerSlab.sync_weights_bf16", || {
            self.slab.sync_weights_bf16();
            Ok(())
        }))
    }

    /// Sum of squares of an fp32 part, read by Rust (f64 accumulation, deterministic).
    fn sq_norm(&self, py: Python<'_>, name: &str) -> PyResult<f64> {
        let p = part(name)?;
        if p == Part::WeightsBf16 {
            return Err(err("sq_norm reads fp32 parts only, not weights_bf16"));
        }
        let ptr = self.slab.part_ptr(p).ok_or_else(|| err(format!("this slab has no {name:?}")))? as usize;
        let n = self.slab.numel();
        py.allow_threads(move || {
            guard("LayerSlab.sq_norm", || {
                // SAFETY: a part of n f32 inside the slab's live mapping; a read only.
                let s = if n == 0 { &[][..] } else { unsafe { std::slice::from_raw_parts(ptr as *const f32, n) } };
                Ok(crate::adam::grad_sq_norm(s))
            })
        })
    }

    #[getter]
    fn numel(&self) -> usize {
        self.slab.numel()
    }

    #[getter]
    fn address(&self) -> usize {
        self.slab.region().as_ptr() as usize
    }

    #[getter]
    fn nbytes(&self) -> usize {
        self.slab.region().len()
    }
}

/// Per-node page counts of the mapping holding `address`, from /proc/self/numa_maps:
/// (list of (node, pages), page size in KiB), or None where the kernel does not say.
#[pyfunction]
fn numa_pages(address: usize) -> Option<(Vec<(u32, u64)>, u64)> {
    memory::numa_pages(address)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyHostRegion>()?;
    m.add_class::<PyLayerSlab>()?;
    m.add_function(wrap_pyfunction!(numa_pages, m)?)?;
    Ok(())
}
