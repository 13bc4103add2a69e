//! Bindings of the transfer pipeline: slot rings, lanes and their tickets.

use super::adam::PyAdamW;
use super::err;
use crate::pipeline::{lane::RawPtr, lane::Step, Job, Lane, SlotRing, Ticket};
use pyo3::prelude::*;
use std::sync::Arc;
use std::time::Duration;

#[pyclass(name = "SlotRing", module = "horizon._native", frozen)]
pub struct PySlotRing {
    ring: Arc<SlotRing>,
}

#[pymethods]
impl PySlotRing {
    #[new]
    fn new(n: usize) -> PyResult<Self> {
        if n == 0 {
            return Err(err("SlotRing needs at least one slot"));
        }
        Ok(PySlotRing { ring: Arc::new(SlotRing::new(n)) })
    }

    /// A free slot, or None when none became free within `timeout_s` seconds.
    fn acquire(&self, py: Python<'_>, timeout_s: f64) -> Option<usize> {
        let ring = self.ring.clone();
        py.allow_threads(move || ring.acquire(Duration::from_secs_f64(timeout_s.max(0.0))))
    }

    fn try_acquire(&self) -> Option<usize> {
        self.ring.try_acquire()
    }

    fn release(&self, slot: usize) -> PyResult<()> {
        self.ring.release(slot).map_err(err)
    }

    #[getter]
    fn free_count(&self) -> usize {
        self.ring.free_count()
    }

    fn __len__(&self) -> usize {
        self.ring.len()
    }
}

#[pyclass(name = "Ticket", module = "horizon._native", frozen)]
#[derive(Clone)]
pub struct PyTicket {
    t: Ticket,
}

#[pymethods]
impl PyTicket {
    /// Blocks (without the GIL) until the job has run; raises the lane's error if one failed.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        let t = self.t.clone();
        py.allow_threads(move || t.wait()).map_err(err)
    }

    #[getter]
    fn done(&self) -> bool {
        self.t.is_done()
    }
}

/// Worker lanes: `h2d` (weight copies on the CPU device), `d2h` (gradient landing copies)
/// and `optimizer` (AdamW, from a landing slot or a slab's gradient buffer).
#[pyclass(name = "Pipeline", module = "horizon._native", frozen)]
pub struct PyPipeline {
    h2d: Lane,
    d2h: Lane,
    optimizer: Lane,
}

fn deps(after: Option<Vec<PyRef<'_, PyTicket>>>) -> Vec<Ticket> {
    after.unwrap_or_default().iter().map(|t| t.t.clone()).collect()
}

/// A job with its ordering: tickets to wait for, a CUDA event to sync on, a slot to free after.
fn step_of(
    job: Job,
    after: Option<Vec<PyRef<'_, PyTicket>>>,
    cuda_event: Option<(u64, i32)>,
    release: Option<(PyRef<'_, PySlotRing>, usize)>,
) -> PyResult<Step> {
    Ok(Step { job, after: deps(after), cuda_event, release: release_of(release)? })
}

fn release_of(release: Option<(PyRef<'_, PySlotRing>, usize)>) -> PyResult<Option<(Arc<SlotRing>, usize)>> {
    match release {
        None => Ok(None),
        Some((r, i)) if i < r.ring.len() => Ok(Some((r.ring.clone(), i))),
        Some((r, i)) => Err(err(format!("slot {i} out of range (ring of {})", r.ring.len()))),
    }
}

impl PyPipeline {
    fn lane(&self, name: &str) -> PyResult<&Lane> {
        match name {
            "h2d" => Ok(&self.h2d),
            "d2h" => Ok(&self.d2h),
            "optimizer" => Ok(&self.optimizer),
            _ => Err(err(format!("unknown lane {name:?} (h2d, d2h, optimizer)"))),
        }
    }
}

#[pymethods]
impl PyPipeline {
    #[new]
    fn new() -> Self {
        PyPipeline { h2d: Lane::new("h2d"), d2h: Lane::new("d2h"), optimizer: Lane::new("optimizer") }
    }

    /// Queues a host memcpy on `lane`. The caller keeps both buffers alive until the ticket is done.
    #[pyo3(signature = (lane, dst, src, nbytes, *, after=None, cuda_event=None, release=None))]
    #[allow(clippy::too_many_arguments)]
    fn copy(
        &self,
        lane: &str,
        dst: usize,
        src: usize,
        nbytes: usize,
        after: Option<Vec<PyRef<'_, PyTicket>>>,
        cuda_event: Option<(u64, i32)>,
        release: Option<(PyRef<'_, PySlotRing>, usize)>,
    ) -> PyResult<PyTicket> {
        if nbytes > 0 && (dst == 0 || src == 0) {
            return Err(err("copy: null pointer"));
        }
        let job = Job::Copy { dst: RawPtr(dst), src: RawPtr(src), bytes: nbytes };
        Ok(PyTicket { t: self.lane(lane)?.submit(step_of(job, after, cuda_event, release)?) })
    }

    /// Queues AdamW over `n` fp32 elements on the optimizer lane (`w_bf16` = 0: no bf16 copy),
    /// with the hyper-parameters `hyper`, as step `step` (1-based), the gradient scaled by
    /// `grad_scale`; `gate` = address of an i32 that voids the update when 0 as the job runs
    /// (0: none).
    #[pyo3(signature = (p, g, m, v, w_bf16, n, *, hyper, step, grad_scale=1.0, skip_nonfinite=false, after=None, cuda_event=None, release=None, gate=0))]
    #[allow(clippy::too_many_arguments)]
    fn adam(
        &self,
        p: usize,
        g: usize,
        m: usize,
        v: usize,
        w_bf16: usize,
        n: usize,
        hyper: PyRef<'_, PyAdamW>,
        step: u64,
        grad_scale: f64,
        skip_nonfinite: bool,
        after: Option<Vec<PyRef<'_, PyTicket>>>,
        cuda_event: Option<(u64, i32)>,
        release: Option<(PyRef<'_, PySlotRing>, usize)>,
        gate: usize,
    ) -> PyResult<PyTicket> {
        if n > 0 && (p == 0 || g == 0 || m == 0 || v == 0) {
            return Err(err("adam: null pointer"));
        }
        if step == 0 {
            return Err(err("adam: step counts from 1"));
        }
        let job = Job::Adam {
            p: RawPtr(p),
            g: RawPtr(g),
            m: RawPtr(m),
            v: RawPtr(v),
            w_bf16: RawPtr(w_bf16),
            n,
            hyper: hyper.hyper,
            step,
            grad_scale,
            skip_nonfinite,
            gate: RawPtr(gate),
        };
        Ok(PyTicket { t: self.optimizer.submit(step_of(job, after, cuda_event, release)?) })
    }

    /// A ticket that is done once every job queued on `lane` so far has run (and, when given,
    /// the CUDA event has completed).
    #[pyo3(signature = (lane, *, cuda_event=None))]
    fn marker(&self, lane: &str, cuda_event: Option<(u64, i32)>) -> PyResult<PyTicket> {
        Ok(PyTicket { t: self.lane(lane)?.submit(step_of(Job::Marker, None, cuda_event, None)?) })
    }

    /// AdamW jobs skipped so far because their gradient was not finite.
    #[getter]
    fn skipped_updates(&self) -> u64 {
        self.optimizer.state.skipped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Seconds `lane`'s worker spent running jobs (the engine sizes its landing ring from the
    /// optimizer lane's rate).
    fn busy_seconds(&self, lane: &str) -> PyResult<f64> {
        Ok(self.lane(lane)?.state.busy_ns.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySlotRing>()?;
    m.add_class::<PyTicket>()?;
    m.add_class::<PyPipeline>()?;
    Ok(())
}
