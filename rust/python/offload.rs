//! Bindings of the disk tier (`crate::offload`): the tier and its tickets, the direct-I/O
//! probe, the file-system facts and the sequential bandwidth roof. Python hands over data
//! pointers of tensors it has checked and keeps alive until the tickets are done; this layer
//! re-checks what would make the Rust side unsound (null or misaligned pointers) and releases
//! the GIL whenever it waits.

use super::{err, guard};
use crate::adam::AdamW;
use crate::offload::io::{self, IoChoice, IoConfig};
use crate::offload::tier::{Completion, DiskTier, Durability, GradSource, PartSrc, StepParams, TierOptions, UpdateJob};
use crate::offload::{self as off, ALIGN};
use pyo3::prelude::*;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A one-shot completion of the tier (an update's AdamW, its durable write-back, a flush...).
#[pyclass(name = "DiskTicket", module = "horizon._native", frozen)]
pub struct PyDiskTicket {
    c: Arc<Completion>,
}

#[pymethods]
impl PyDiskTicket {
    /// Blocks (without the GIL) until done; True, or False when `timeout_s` passed first.
    /// Raises HorizonError with the tier's message when the work failed.
    #[pyo3(signature = (timeout_s=None))]
    fn wait(&self, py: Python<'_>, timeout_s: Option<f64>) -> PyResult<bool> {
        let c = self.c.clone();
        let t = timeout_s.map(|s| Duration::from_secs_f64(s.max(0.0)));
        match py.allow_threads(move || c.wait(t)) {
            None => Ok(false),
            Some(Ok(())) => Ok(true),
            Some(Err(e)) => Err(err(e)),
        }
    }

    #[getter]
    fn done(&self) -> bool {
        self.c.is_done()
    }
}

fn ticket(c: Arc<Completion>) -> PyDiskTicket {
    PyDiskTicket { c }
}

/// The disk tier of one model (see `crate::offload::tier`).
#[pyclass(name = "DiskTier", module = "horizon._native", frozen)]
pub struct PyDiskTier {
    tier: Mutex<Option<DiskTier>>,
}

fn aligned(name: &str, ptr: usize, align: usize) -> PyResult<()> {
    if ptr == 0 {
        return Err(err(format!("{name}: null pointer")));
    }
    if !ptr.is_multiple_of(align) {
        return Err(err(format!("{name}: address {ptr:#x} is not {align}-byte aligned")));
    }
    Ok(())
}

fn optional(name: &str, ptr: usize, align: usize) -> PyResult<()> {
    if ptr != 0 {
        aligned(name, ptr, align)?;
    }
    Ok(())
}

impl PyDiskTier {
    fn with<T>(&self, f: impl FnOnce(&DiskTier) -> Result<T, String>) -> PyResult<T> {
        let g = self.tier.lock().unwrap_or_else(|p| p.into_inner());
        let t = g.as_ref().ok_or_else(|| err("the disk tier is closed"))?;
        f(t).map_err(err)
    }
}

#[pymethods]
impl PyDiskTier {
    /// Creates the layer files under `dir` and starts the tier. `numels`: elements per layer;
    /// `with_grad`: a gradient part per file (clipping); `direct`: O_DIRECT (probe it first);
    /// `durability`: "layer" or "step"; `io`: "auto", "uring" or "threads".
    #[new]
    #[pyo3(signature = (dir, numels, *, with_grad, direct, staging_bytes, durability="layer", io="auto", chunk_bytes=1<<20, queue_depth=16, numa_node=None, landing_slots=2))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        dir: PathBuf,
        numels: Vec<usize>,
        with_grad: bool,
        direct: bool,
        staging_bytes: usize,
        durability: &str,
        io: &str,
        chunk_bytes: usize,
        queue_depth: usize,
        numa_node: Option<i64>,
        landing_slots: usize,
    ) -> PyResult<Self> {
        let durability = Durability::parse(durability).map_err(err)?;
        let io = IoChoice::parse(io).map_err(err)?;
        if chunk_bytes == 0 || !chunk_bytes.is_multiple_of(ALIGN) {
            return Err(err(format!("chunk_bytes must be a positive multiple of {ALIGN}, got {chunk_bytes}")));
        }
        if queue_depth == 0 || queue_depth > 1024 {
            return Err(err(format!("queue_depth must be in 1..=1024, got {queue_depth}")));
        }
        let numa_node = match numa_node {
            None => None,
            Some(n) if (0..=u32::MAX as i64).contains(&n) => Some(n as u32),
            Some(n) => return Err(err(format!("numa_node must be a non-negative node id, got {n}"))),
        };
        let opts = TierOptions { staging_bytes, durability, io, io_config: IoConfig { chunk_bytes, queue_depth }, numa_node, landing_slots };
        let tier = py.allow_threads(|| guard("DiskTier", || DiskTier::new(&dir, &numels, with_grad, direct, &opts).map_err(err)))?;
        Ok(PyDiskTier { tier: Mutex::new(Some(tier)) })
    }

    /// Announces a step: its updates will come for `order` (layer indices) in this order, from
    /// the files' gradient parts when `disk_grad`. The reads ahead start now.
    fn begin_step(&self, order: Vec<usize>, disk_grad: bool) -> PyResult<()> {
        self.with(|t| t.begin_step(order, disk_grad))
    }

    /// Queues one layer's AdamW; returns (adam ticket: the compute copy is written, io ticket:
    /// the new state is durable). The gradient: `numel` f32 at `grad_ptr` (a landing slot,
    /// filled from `copy_from` and/or after `cuda_event`), or the file's (`from_disk`).
    #[pyo3(signature = (layer, *, step, lr, beta1, beta2, eps, weight_decay, grad_scale=1.0, grad_ptr=0, copy_from=0, cuda_event=None, landing_slot=None, from_disk=false, skip_nonfinite=false, w_bf16=0, p_copy=0))]
    #[allow(clippy::too_many_arguments)]
    fn update(
        &self,
        layer: usize,
        step: u64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        grad_scale: f64,
        grad_ptr: usize,
        copy_from: usize,
        cuda_event: Option<(u64, i32)>,
        landing_slot: Option<usize>,
        from_disk: bool,
        skip_nonfinite: bool,
        w_bf16: usize,
        p_copy: usize,
    ) -> PyResult<(PyDiskTicket, PyDiskTicket)> {
        if step < 1 {
            return Err(err(format!("update: step counts from 1, got {step}")));
        }
        if !(lr.is_finite() && lr >= 0.0 && (0.0..1.0).contains(&beta1) && (0.0..1.0).contains(&beta2)) {
            return Err(err(format!("update: lr ({lr}) must be finite and >= 0, betas ({beta1}, {beta2}) in [0, 1)")));
        }
        if !(eps.is_finite() && eps >= 0.0 && weight_decay.is_finite() && weight_decay >= 0.0 && grad_scale.is_finite()) {
            return Err(err(format!("update: eps ({eps}), weight_decay ({weight_decay}) and grad_scale ({grad_scale}) must be finite (and eps, weight_decay >= 0)")));
        }
        let grad = if from_disk {
            GradSource::Disk
        } else {
            aligned("grad_ptr", grad_ptr, 4)?;
            optional("copy_from", copy_from, 4)?;
            GradSource::Landing { ptr: grad_ptr, copy_from, cuda_event, slot: landing_slot }
        };
        optional("w_bf16", w_bf16, 2)?;
        optional("p_copy", p_copy, 4)?;
        let hyper = AdamW::new(lr, beta1, beta2, eps, weight_decay).map_err(|e| err(format!("update: {e}")))?;
        let hp = StepParams { hyper, step, grad_scale };
        let job = UpdateJob { layer, grad, hp, skip_nonfinite, w_bf16, p_copy };
        let (a, b) = self.with(|t| t.update(job))?;
        Ok((ticket(a), ticket(b)))
    }

    /// Writes a layer's step gradient (clipping) from a landing slot at `ptr` (page-aligned,
    /// whole pages) into its file, after `cuda_event` / a copy from `copy_from`.
    #[pyo3(signature = (layer, ptr, *, copy_from=0, cuda_event=None, landing_slot=None))]
    fn land(&self, layer: usize, ptr: usize, copy_from: usize, cuda_event: Option<(u64, i32)>, landing_slot: Option<usize>) -> PyResult<PyDiskTicket> {
        aligned("landing buffer", ptr, ALIGN)?;
        optional("copy_from", copy_from, 4)?;
        self.with(|t| t.land(layer, ptr, copy_from, cuda_event, landing_slot)).map(ticket)
    }

    /// A free landing slot index, or None when none became free within `timeout_s`.
    fn acquire_landing(&self, py: Python<'_>, timeout_s: f64) -> PyResult<Option<usize>> {
        let ring = self.with(|t| Ok(t.landing().clone()))?;
        Ok(py.allow_threads(move || ring.acquire(Duration::from_secs_f64(timeout_s.max(0.0)))))
    }

    /// Returns a landing slot that was acquired but not handed to `update` / `land`.
    fn release_landing(&self, slot: usize) -> PyResult<()> {
        self.with(|t| t.landing().release(slot))
    }

    /// Drops the read-ahead of layers whose update never came.
    fn cancel(&self) -> PyResult<()> {
        self.with(|t| {
            t.cancel();
            Ok(())
        })
    }

    /// A ticket done once everything queued before is durable.
    fn flush(&self) -> PyResult<PyDiskTicket> {
        self.with(|t| Ok(t.flush())).map(ticket)
    }

    /// Writes a layer's parts: each an address of `numel` f32, 0 for zeros, None to keep.
    #[pyo3(signature = (layer, master, exp_avg, exp_avg_sq))]
    fn write_state(&self, layer: usize, master: Option<usize>, exp_avg: Option<usize>, exp_avg_sq: Option<usize>) -> PyResult<PyDiskTicket> {
        let part = |name: &str, p: Option<usize>| -> PyResult<PartSrc> {
            Ok(match p {
                None => PartSrc::Keep,
                Some(0) => PartSrc::Zero,
                Some(a) => {
                    aligned(name, a, 4)?;
                    PartSrc::Buf(a)
                }
            })
        };
        let src = [part("master", master)?, part("exp_avg", exp_avg)?, part("exp_avg_sq", exp_avg_sq)?];
        self.with(|t| t.write_state(layer, src)).map(ticket)
    }

    /// Reads a layer's parts into addresses of `numel` f32 (0: skip the part).
    #[pyo3(signature = (layer, master=0, exp_avg=0, exp_avg_sq=0))]
    fn read_state(&self, layer: usize, master: usize, exp_avg: usize, exp_avg_sq: usize) -> PyResult<PyDiskTicket> {
        optional("master", master, 4)?;
        optional("exp_avg", exp_avg, 4)?;
        optional("exp_avg_sq", exp_avg_sq, 4)?;
        self.with(|t| t.read_state(layer, [master, exp_avg, exp_avg_sq])).map(ticket)
    }

    /// Rewrites a layer's compute copy from its master on disk: bf16 at `w_bf16` and/or fp32
    /// at `p_copy` (0: none).
    #[pyo3(signature = (layer, w_bf16=0, p_copy=0))]
    fn refresh(&self, layer: usize, w_bf16: usize, p_copy: usize) -> PyResult<PyDiskTicket> {
        optional("w_bf16", w_bf16, 2)?;
        optional("p_copy", p_copy, 4)?;
        self.with(|t| t.refresh(layer, w_bf16, p_copy)).map(ticket)
    }

    /// (path, numel, part_bytes, with_grad) of a layer's file: part k starts at k * part_bytes.
    fn layer_file(&self, layer: usize) -> PyResult<(String, usize, usize, bool)> {
        self.with(|t| {
            let l = *t.layouts().get(layer).ok_or_else(|| format!("layer {layer} out of range"))?;
            Ok((t.layer_path(layer).display().to_string(), l.numel, l.part_bytes, l.with_grad))
        })
    }

    fn info_json(&self) -> PyResult<String> {
        self.with(|t| Ok(serde_json::to_string(t.info()).unwrap_or_default()))
    }

    fn stats_json(&self) -> PyResult<String> {
        self.with(|t| Ok(serde_json::to_string(&t.stats()).unwrap_or_default()))
    }

    /// Finishes the I/O in flight and removes the files; later calls raise.
    fn close(&self, py: Python<'_>) {
        let t = self.tier.lock().unwrap_or_else(|p| p.into_inner()).take();
        py.allow_threads(move || drop(t));
    }

    #[getter]
    fn closed(&self) -> bool {
        self.tier.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }
}

/// None when files under `dir` accept O_DIRECT, else the reason they do not.
#[pyfunction]
fn offload_probe_direct(py: Python<'_>, dir: PathBuf) -> Option<String> {
    py.allow_threads(|| off::probe_direct(&dir).err())
}

/// The file system under `dir` as JSON: available_bytes, total_bytes, fs_type, in_memory.
#[pyfunction]
fn offload_fs_info_json(dir: PathBuf) -> PyResult<String> {
    off::fs_info(&dir).map(|i| serde_json::to_string(&i).unwrap_or_default()).map_err(err)
}

/// (back end "io_uring" or "threads", why) that `io="auto"` picks on this machine.
#[pyfunction]
fn offload_io_probe(py: Python<'_>) -> (String, String) {
    py.allow_threads(io::probe)
}

/// Sequential read / write bandwidth of `dir`'s disk through the tier's I/O path, as JSON.
#[pyfunction]
#[pyo3(signature = (dir, nbytes, *, chunk_bytes=1<<20, queue_depth=16, io="auto", direct=true))]
fn offload_roof_json(py: Python<'_>, dir: PathBuf, nbytes: usize, chunk_bytes: usize, queue_depth: usize, io: &str, direct: bool) -> PyResult<String> {
    let choice = IoChoice::parse(io).map_err(err)?;
    if chunk_bytes == 0 || queue_depth == 0 {
        return Err(err("chunk_bytes and queue_depth must be positive"));
    }
    let r = py.allow_threads(|| {
        guard("offload_roof", || off::roof::measure(&dir, nbytes, IoConfig { chunk_bytes, queue_depth }, choice, direct).map_err(err))
    })?;
    Ok(serde_json::to_string(&r).unwrap_or_default())
}

/// The same measurement over existing files (read and overwritten whole: their contents are
/// lost), e.g. an idle tier's layer files, as JSON.
#[pyfunction]
#[pyo3(signature = (paths, *, chunk_bytes=1<<20, queue_depth=16, io="auto", direct=true))]
fn offload_roof_files_json(py: Python<'_>, paths: Vec<PathBuf>, chunk_bytes: usize, queue_depth: usize, io: &str, direct: bool) -> PyResult<String> {
    let choice = IoChoice::parse(io).map_err(err)?;
    if chunk_bytes == 0 || queue_depth == 0 {
        return Err(err("chunk_bytes and queue_depth must be positive"));
    }
    let r = py.allow_threads(|| {
        guard("offload_roof_files", || off::roof::measure_files(&paths, IoConfig { chunk_bytes, queue_depth }, choice, direct).map_err(err))
    })?;
    Ok(serde_json::to_string(&r).unwrap_or_default())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDiskTier>()?;
    m.add_class::<PyDiskTicket>()?;
    m.add_function(wrap_pyfunction!(offload_probe_direct, m)?)?;
    m.add_function(wrap_pyfunction!(offload_fs_info_json, m)?)?;
    m.add_function(wrap_pyfunction!(offload_io_probe, m)?)?;
    m.add_function(wrap_pyfunction!(offload_roof_json, m)?)?;
    m.add_function(wrap_pyfunction!(offload_roof_files_json, m)?)?;
    Ok(())
}
