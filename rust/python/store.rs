//! Bindings of the host store: host regions and layer slabs exported to torch as DLPack
//! capsules (no copy; the capsule's deleter keeps the Rust allocation alive), and where their
//! pages landed. The CPU AdamW bindings live in `store/optim.rs`.

mod optim;

use super::{err, guard};
use crate::memory::{self, HostRegion, LayerSlab, Part, RegionOptions};
use pyo3::ffi;
use pyo3::prelude::*;
use std::ffi::{c_void, CStr};
use std::sync::Arc;

// ---- DLPack (the stable v0 ABI that torch.from_dlpack accepts as a "dltensor" capsule) ----

#[repr(C)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

const KDL_CPU: i32 = 1;
const DLTENSOR: &CStr = c"dltensor";

/// What a capsule keeps alive: the region, and the shape/stride arrays the DLTensor points at.
/// `managed` is the first field so the DLManagedTensor pointer is the context pointer.
#[repr(C)]
struct Export {
    managed: DLManagedTensor,
    shape: [i64; 1],
    strides: [i64; 1],
    _region: Arc<HostRegion>,
}

unsafe extern "C" fn export_deleter(t: *mut DLManagedTensor) {
    if !t.is_null() {
        // SAFETY: t is the `managed` field of a Box<Export> leaked in `export`; this runs once
        // (torch's tensor free, or our capsule destructor for an unconsumed capsule).
        drop(unsafe { Box::from_raw((*t).manager_ctx as *mut Export) });
    }
}

unsafe extern "C" fn capsule_destructor(capsule: *mut ffi::PyObject) {
    // A consumed capsule was renamed "used_dltensor" and belongs to torch: IsValid is false.
    // SAFETY: CPython hands us the capsule being destroyed.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, DLTENSOR.as_ptr()) == 1 {
            let t = ffi::PyCapsule_GetPointer(capsule, DLTENSOR.as_ptr()) as *mut DLManagedTensor;
            if let Some(d) = (*t).deleter {
                d(t);
            }
        }
    }
}

fn dl_dtype(name: &str) -> Option<(DLDataType, usize)> {
    let (code, bits) = match name {
        "float32" => (2, 32),
        "float64" => (2, 64),
        "float16" => (2, 16),
        "bfloat16" => (4, 16),
        "uint8" => (1, 8),
        "int8" => (0, 8),
        "int16" => (0, 16),
        "int32" => (0, 32),
        "int64" => (0, 64),
        _ => return None,
    };
    Some((DLDataType { code, bits, lanes: 1 }, bits as usize / 8))
}

/// A "dltensor" capsule viewing `numel` elements of `dtype` at `offset` bytes into `region`.
fn export(py: Python<'_>, region: &Arc<HostRegion>, offset: usize, numel: usize, dtype: &str) -> PyResult<PyObject> {
    let (dt, size) = dl_dtype(dtype).ok_or_else(|| err(format!("unsupported dtype {dtype:?} for a host buffer")))?;
    let end = numel.checked_mul(size).and_then(|b| b.checked_add(offset));
    if end.is_none_or(|e| e > region.len()) {
        return Err(err(format!("view of {numel} x {dtype} at offset {offset} exceeds the region ({} bytes)", region.len())));
    }
    if !offset.is_multiple_of(size) {
        return Err(err(format!("offset {offset} is not a multiple of the {dtype} size {size}")));
    }
    let mut e = Box::new(Export {
        managed: DLManagedTensor {
            dl_tensor: DLTensor {
                // SAFETY: in bounds, checked above.
                data: unsafe { region.as_ptr().add(offset) } as *mut c_void,
                device: DLDevice { device_type: KDL_CPU, device_id: 0 },
                ndim: 1,
                dtype: dt,
                shape: std::ptr::null_mut(),
                strides: std::ptr::null_mut(),
                byte_offset: 0,
            },
            manager_ctx: std::ptr::null_mut(),
            deleter: Some(export_deleter),
        },
        shape: [numel as i64],
        strides: [1],
        _region: Arc::clone(region),
    });
    e.managed.dl_tensor.shape = e.shape.as_mut_ptr();
    e.managed.dl_tensor.strides = e.strides.as_mut_ptr();
    let raw = Box::into_raw(e);
    // SAFETY: raw is a live Export; its managed field is at offset 0 (repr(C)).
    unsafe {
        (*raw).managed.manager_ctx = raw as *mut c_void;
        let cap = ffi::PyCapsule_New(raw as *mut c_void, DLTENSOR.as_ptr(), Some(capsule_destructor));
        if cap.is_null() {
            drop(Box::from_raw(raw));
            return Err(PyErr::fetch(py));
        }
        Ok(PyObject::from_owned_ptr(py, cap))
    }
}

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
    optim::register(m)?;
    m.add_class::<PyHostRegion>()?;
    m.add_class::<PyLayerSlab>()?;
    m.add_function(wrap_pyfunction!(numa_pages, m)?)?;
    Ok(())
}
