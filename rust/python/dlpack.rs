//! DLPack export of host memory: a "dltensor" capsule (the stable v0 ABI that
//! torch.from_dlpack accepts) viewing part of a `HostRegion`, with no copy; the capsule's
//! deleter keeps the Rust allocation alive as long as torch's tensor lives.

use super::err;
use crate::memory::HostRegion;
use pyo3::ffi;
use pyo3::prelude::*;
use std::ffi::{c_void, CStr};
use std::sync::Arc;

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
pub(crate) fn export(py: Python<'_>, region: &Arc<HostRegion>, offset: usize, numel: usize, dtype: &str) -> PyResult<PyObject> {
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
