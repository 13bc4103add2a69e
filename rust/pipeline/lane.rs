//! `Lane`: one worker thread running jobs in order (host copies, AdamW, markers).

use crate::adam::{self, AdamW};
use crate::pipeline::SlotRing;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A job's place in its lane: done once the lane has completed `seq` jobs.
#[derive(Clone)]
pub struct Ticket {
    pub lane: Arc<LaneState>,
    pub seq: u64,
}

impl Ticket {
    pub fn is_done(&self) -> bool {
        self.lane.completed.load(Ordering::Acquire) >= self.seq
    }
    pub fn wait(&self) -> Result<(), String> {
        self.lane.wait_for(self.seq, None).map(|_| ())
    }
}

/// Raw buffers handed across threads. The Python side keeps every buffer alive until the
/// job's ticket is done (it holds the tensors until it has waited).
#[derive(Clone, Copy, Debug)]
pub struct RawPtr(pub usize);
// SAFETY: see above; the pointers are only dereferenced by the job that owns them.
unsafe impl Send for RawPtr {}

pub enum Job {
    /// memcpy of `bytes` from `src` to `dst` (host memory on both sides).
    Copy { dst: RawPtr, src: RawPtr, bytes: usize },
    /// AdamW over `n` elements; `w_bf16` (0 = none) gets the rounded copy. With
    /// `skip_nonfinite`, a gradient holding NaN/Inf leaves the layer untouched (counted in
    /// the lane's `skipped`): the check runs here, so the device never waits on the host.
    /// `step` (1-based) and `grad_scale` are this step's; `hyper` the optimizer's.
    /// `gate` (0 = none) points at an i32 the step writes (a device-to-host copy ordered
    /// before the job's CUDA event, or a host write before the job was queued): 0 there
    /// means the whole step is void (its loss was not finite), so the job changes nothing
    /// (counted in the lane's `gated`).
    Adam {
        p: RawPtr,
        g: RawPtr,
        m: RawPtr,
        v: RawPtr,
        w_bf16: RawPtr,
        n: usize,
        hyper: AdamW,
        step: u64,
        grad_scale: f64,
        skip_nonfinite: bool,
        gate: RawPtr,
    },
    /// Nothing: used to mark a point in the lane (e.g. "everything before is done").
    Marker,
}

pub struct Step {
    pub job: Job,
    /// Tickets (of any lane) to wait for before running.
    pub after: Vec<Ticket>,
    /// A CUDA event (raw handle) to synchronise on before running, with its device; created
    /// with blocking synchronisation, so the worker sleeps while it waits.
    pub cuda_event: Option<(u64, i32)>,
    /// A slot to return to its ring once the job is done.
    pub release: Option<(Arc<SlotRing>, usize)>,
}

pub struct LaneState {
    queue: Mutex<VecDeque<(u64, Step)>>,
    has_work: Condvar,
    completed: AtomicU64,
    submitted: AtomicU64,
    done_lock: Mutex<()>,
    done: Condvar,
    error: Mutex<Option<String>>,
    shutdown: AtomicU64,
    /// Nanoseconds this lane's worker spent running jobs (not waiting for them).
    pub busy_ns: AtomicU64,
    /// AdamW jobs skipped because their gradient was not finite.
    pub skipped: AtomicU64,
    /// AdamW jobs skipped because their gate said the step is void.
    pub gated: AtomicU64,
}

impl LaneState {
    fn wait_for(&self, seq: u64, timeout: Option<Duration>) -> Result<bool, String> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut g = self.done_lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(e) = self.error.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                return Err(e);
            }
            if self.completed.load(Ordering::Acquire) >= seq {
                return Ok(true);
            }
            let wait = match deadline {
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return Ok(false);
                    }
                    (d - now).min(Duration::from_millis(50))
                }
                None => Duration::from_millis(50),
            };
            g = self.done.wait_timeout(g, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

pub struct Lane {
    pub state: Arc<LaneState>,
    worker: Option<JoinHandle<()>>,
}

impl Lane {
    pub fn new(name: &str) -> Lane {
        let state = Arc::new(LaneState {
            queue: Mutex::new(VecDeque::new()),
            has_work: Condvar::new(),
            completed: AtomicU64::new(0),
            submitted: AtomicU64::new(0),
            done_lock: Mutex::new(()),
            done: Condvar::new(),
            error: Mutex::new(None),
            shutdown: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            gated: AtomicU64::new(0),
        });
        let s = state.clone();
        let worker = std::thread::Builder::new()
            .name(format!("horizon-{name}"))
            .spawn(move || run(s))
            .expect("spawn pipeline lane");
        Lane { state, worker: Some(worker) }
    }

    pub fn submit(&self, step: Step) -> Ticket {
        let mut q = self.state.queue.lock().unwrap_or_else(|p| p.into_inner());
        let seq = self.state.submitted.fetch_add(1, Ordering::AcqRel) + 1;
        q.push_back((seq, step));
        drop(q);
        self.state.has_work.notify_one();
        Ticket { lane: self.state.clone(), seq }
    }

    /// Waits until every job submitted so far has run; reports the lane's first error.
    pub fn drain(&self) -> Result<(), String> {
        let seq = self.state.submitted.load(Ordering::Acquire);
        self.state.wait_for(seq, None).map(|_| ())
    }

    pub fn wait(&self, seq: u64, timeout: Option<Duration>) -> Result<bool, String> {
        self.state.wait_for(seq, timeout)
    }

    pub fn completed(&self) -> u64 {
        self.state.completed.load(Ordering::Acquire)
    }

    pub fn submitted(&self) -> u64 {
        self.state.submitted.load(Ordering::Acquire)
    }

    pub fn error(&self) -> Option<String> {
        self.state.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.state.shutdown.store(1, Ordering::Release);
        self.state.has_work.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn run(s: Arc<LaneState>) {
    loop {
        let next = {
            let mut q = s.queue.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(item) = q.pop_front() {
                    break Some(item);
                }
                if s.shutdown.load(Ordering::Acquire) != 0 {
                    break None;
                }
                q = s.has_work.wait_timeout(q, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
            }
        };
        let Some((seq, step)) = next else { return };
        let failed = s.error.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        if !failed {
            let t0 = std::time::Instant::now();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| execute(step, &s)));
            s.busy_ns.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            let err = match r {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("a pipeline job panicked".to_string()),
            };
            if let Some(e) = err {
                *s.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
        }
        s.completed.store(seq, Ordering::Release);
        let _g = s.done_lock.lock().unwrap_or_else(|p| p.into_inner());
        s.done.notify_all();
    }
}

fn execute(step: Step, lane: &LaneState) -> Result<(), String> {
    for t in &step.after {
        t.wait()?;
    }
    if let Some((event, device)) = step.cuda_event {
        // A blocking-sync event (the submitter's contract): this thread sleeps, it does not
        // spin a core the AdamW pool needs.
        crate::cuda::event_synchronize(event, device).map_err(|e| e.to_string())?;
    }
    // SAFETY (all arms): the submitter guarantees the buffers are live, large enough and not
    // touched by anyone else until this job's ticket is done.
    unsafe {
        match step.job {
            Job::Copy { dst, src, bytes } => {
                std::ptr::copy_nonoverlapping(src.0 as *const u8, dst.0 as *mut u8, bytes);
            }
            Job::Adam { p, g, m, v, w_bf16, n, hyper, step: t, grad_scale, skip_nonfinite, gate } => {
                let void = gate.0 != 0 && std::ptr::read_volatile(gate.0 as *const i32) == 0;
                let g = std::slice::from_raw_parts(g.0 as *const f32, n);
                let counter = if void {
                    Some(&lane.gated)
                } else if skip_nonfinite && !adam::all_finite(g) {
                    Some(&lane.skipped)
                } else {
                    None
                };
                if let Some(c) = counter {
                    c.fetch_add(1, Ordering::Relaxed);
                    if let Some((ring, slot)) = step.release {
                        ring.release(slot)?;
                    }
                    return Ok(());
                }
                let p = std::slice::from_raw_parts_mut(p.0 as *mut f32, n);
                let m = std::slice::from_raw_parts_mut(m.0 as *mut f32, n);
                let v = std::slice::from_raw_parts_mut(v.0 as *mut f32, n);
                let w = (w_bf16.0 != 0).then(|| std::slice::from_raw_parts_mut(w_bf16.0 as *mut u16, n));
                adam::adamw_step(p, g, m, v, w, &hyper, t, grad_scale);
            }
            Job::Marker => {}
        }
    }
    if let Some((ring, slot)) = step.release {
        ring.release(slot)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_in_order_and_tickets_complete() {
        let lane = Lane::new("test");
        let src: Vec<u8> = (0..255).collect();
        let mut dst = vec![0u8; 255];
        let t = lane.submit(Step {
            job: Job::Copy { dst: RawPtr(dst.as_mut_ptr() as usize), src: RawPtr(src.as_ptr() as usize), bytes: 255 },
            after: vec![],
            cuda_event: None,
            release: None,
        });
        t.wait().unwrap();
        assert!(t.is_done());
        assert_eq!(dst, src);
    }

    #[test]
    fn cross_lane_dependency_and_slot_release() {
        // copy lane lands a gradient; the optimizer lane runs AdamW on it only after the
        // landing, then frees the landing slot
        let copy = Lane::new("copy");
        let opt = Lane::new("opt");
        let ring = Arc::new(SlotRing::new(1));
        let slot = ring.try_acquire().unwrap();
        let n = 1000;
        let src = vec![0.5f32; n];
        let mut landing = vec![0f32; n];
        let (mut p, mut m, mut v) = (vec![1f32; n], vec![0f32; n], vec![0f32; n]);
        let hyper = AdamW::new(0.1, 0.9, 0.999, 1e-8, 0.0).unwrap();
        let t1 = copy.submit(Step {
            job: Job::Copy { dst: RawPtr(landing.as_mut_ptr() as usize), src: RawPtr(src.as_ptr() as usize), bytes: 4 * n },
            after: vec![],
            cuda_event: None,
            release: None,
        });
        let t2 = opt.submit(Step {
            job: Job::Adam {
                p: RawPtr(p.as_mut_ptr() as usize),
                g: RawPtr(landing.as_ptr() as usize),
                m: RawPtr(m.as_mut_ptr() as usize),
                v: RawPtr(v.as_mut_ptr() as usize),
                w_bf16: RawPtr(0),
                n,
                hyper,
                step: 1,
                grad_scale: 1.0,
                skip_nonfinite: true,
                gate: RawPtr(0),
            },
            after: vec![t1],
            cuda_event: None,
            release: Some((ring.clone(), slot)),
        });
        t2.wait().unwrap();
        // step 1 of Adam moves every parameter by -lr * sign(g) (up to eps)
        assert!(p.iter().all(|&x| (x - 0.9).abs() < 1e-5), "{}", p[0]);
        assert_eq!(ring.free_count(), 1);
        drop(landing);
    }

    #[test]
    fn a_closed_gate_voids_the_update_and_frees_the_slot() {
        let opt = Lane::new("gate");
        let ring = Arc::new(SlotRing::new(1));
        let n = 64;
        let g = vec![0.25f32; n];
        let (mut p, mut m, mut v) = (vec![1f32; n], vec![0f32; n], vec![0f32; n]);
        let hyper = AdamW::new(0.1, 0.9, 0.999, 1e-8, 0.0).unwrap();
        for open in [0i32, 1] {
            let gate = [open];
            let slot = ring.try_acquire().unwrap();
            let t = opt.submit(Step {
                job: Job::Adam {
                    p: RawPtr(p.as_mut_ptr() as usize),
                    g: RawPtr(g.as_ptr() as usize),
                    m: RawPtr(m.as_mut_ptr() as usize),
                    v: RawPtr(v.as_mut_ptr() as usize),
                    w_bf16: RawPtr(0),
                    n,
                    hyper,
                    step: 1,
                    grad_scale: 1.0,
                    skip_nonfinite: true,
                    gate: RawPtr(gate.as_ptr() as usize),
                },
                after: vec![],
                cuda_event: None,
                release: Some((ring.clone(), slot)),
            });
            t.wait().unwrap();
            assert_eq!(ring.free_count(), 1);
            let moved = p.iter().all(|&x| (x - 0.9).abs() < 1e-5);
            let untouched = p.iter().all(|&x| x == 1.0) && m.iter().all(|&x| x == 0.0);
            assert!(if open == 0 { untouched } else { moved }, "gate {open}: p[0] = {}", p[0]);
        }
        assert_eq!(opt.state.gated.load(Ordering::Relaxed), 1);
        assert_eq!(opt.state.skipped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn an_error_is_reported_to_waiters() {
        let lane = Lane::new("err");
        let ring = Arc::new(SlotRing::new(1));
        // releasing a slot that was never taken is an error
        let t = lane.submit(Step { job: Job::Marker, after: vec![], cuda_event: None, release: Some((ring, 0)) });
        assert!(t.wait().unwrap_err().contains("released twice"));
        assert!(lane.drain().is_err());
    }
}
