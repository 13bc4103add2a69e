//! The disk tier's runtime: one thread that owns the staging memory and every decision, fed by
//! messages (the caller's commands, I/O completions, gradients becoming ready).
//!
//! A step declares its update order (`begin_step`). The runtime reads the layers' state ahead in
//! that order into a ring of staging memory, as far as the budget allows and never before the
//! previous write of the same layer has finished. When a layer's update arrives and both its
//! state and its gradient are in host memory, the fused AdamW (`adam::adamw_step`, the same call
//! as the RAM-only path, hence the same bits) runs on the staging buffers and writes the compute
//! copy; the caller may read that copy from then on (`adam_done`). The state is then written
//! back from staging; `io_done` fires once it is durable: after the layer file's `fdatasync`
//! (`Durability::Layer`), or after the step's last write and one `fdatasync` per written file
//! (`Durability::Step`). With gradient clipping the gradient of the step waits in the layer
//! file (`land`) until the norm is known, and is read back with the state.
//!
//! An I/O error fails every pending completion with one message and the tier stays failed.

use super::files::TierFiles;
use super::io::{self, Backend, IoChoice, IoConfig, Op, OpKind};
use super::layout::{LayerLayout, StagingRing, EXP_AVG, EXP_AVG_SQ, GRAD, MASTER};
use crate::adam::{self, AdamW};
use crate::memory::{HostRegion, RegionOptions};
use crate::pipeline::SlotRing;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Durability {
    /// `fdatasync` of a layer's file right after its write-back.
    Layer,
    /// One `fdatasync` per written file once the step's last write-back is done.
    Step,
}

impl Durability {
    pub fn parse(s: &str) -> Result<Durability, String> {
        match s {
            "layer" => Ok(Durability::Layer),
            "step" => Ok(Durability::Step),
            _ => Err(format!("durability must be 'layer' or 'step', got {s:?}")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct TierOptions {
    /// Bytes of host staging memory; at least one layer's file.
    pub staging_bytes: usize,
    pub durability: Durability,
    pub io: IoChoice,
    pub io_config: IoConfig,
    pub numa_node: Option<u32>,
    /// Landing slots the caller's gradients wait in (their free list lives here).
    pub landing_slots: usize,
}

/// A one-shot completion the caller can wait on.
pub struct Completion {
    state: Mutex<Option<Result<(), String>>>,
    cv: Condvar,
}

impl Completion {
    pub fn new() -> Arc<Completion> {
        Arc::new(Completion { state: Mutex::new(None), cv: Condvar::new() })
    }

    fn done_with(r: Result<(), String>) -> Arc<Completion> {
        let c = Completion::new();
        c.complete(r);
        c
    }

    pub fn complete(&self, r: Result<(), String>) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.is_none() {
            *s = Some(r);
            self.cv.notify_all();
        }
    }

    pub fn is_done(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// The result, or None when `timeout` passed first.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<Result<(), String>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = s.as_ref() {
                return Some(r.clone());
            }
            let wait = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    d - now
                }
                None => Duration::from_secs(3600),
            };
            s = self.cv.wait_timeout(s, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// Where an update's gradient comes from.
#[derive(Clone, Copy, Debug)]
pub enum GradSource {
    /// A host landing buffer of `numel` f32. It holds the gradient once the CUDA event (raw
    /// handle, device) has completed and, when `copy_from` is not 0, once `numel` f32 have been
    /// copied from there (the CPU device). `slot` goes back to the landing free list after use.
    Landing { ptr: usize, copy_from: usize, cuda_event: Option<(u64, i32)>, slot: Option<usize> },
    /// The step's gradient in the layer file, put there by `land` (the clipping schedule).
    Disk,
}

/// What one layer's AdamW step runs with: the hyper-parameters, the 1-based step number and
/// the gradient's scale (clipping).
#[derive(Clone, Copy, Debug)]
pub struct StepParams {
    pub hyper: AdamW,
    pub step: u64,
    pub grad_scale: f64,
}

#[derive(Clone, Copy, Debug)]
pub struct UpdateJob {
    pub layer: usize,
    pub grad: GradSource,
    pub hp: StepParams,
    /// Leave the layer untouched (and count it) when the gradient holds NaN/Inf.
    pub skip_nonfinite: bool,
    /// The bf16 compute copy to write (0: none).
    pub w_bf16: usize,
    /// An fp32 compute copy to refresh from the new master (0: none).
    pub p_copy: usize,
}

/// What a state write takes for one part.
#[derive(Clone, Copy, Debug)]
pub enum PartSrc {
    /// `numel` f32 at this host address.
    Buf(usize),
    Zero,
    /// Leave the part in the file as it is.
    Keep,
}

/// Counters since the tier was made (all I/O, including init and exports).
#[derive(Clone, Debug, Default, Serialize)]
pub struct TierStats {
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub read_ops: u64,
    pub write_ops: u64,
    pub syncs: u64,
    /// Summed latency of the fdatasync calls.
    pub sync_seconds: f64,
    /// Time AdamW ran on staging buffers.
    pub adam_seconds: f64,
    /// Summed time updates waited, after they arrived, for their state or gradient.
    pub update_wait_seconds: f64,
    /// Wall time with at least one disk request in flight.
    pub io_busy_seconds: f64,
    /// Wall time with at least one read in flight (a pass that keeps this near its length is
    /// read-bound: it reads as fast as the disk serves).
    pub read_busy_seconds: f64,
    /// Wall time with at least one write in flight.
    pub write_busy_seconds: f64,
    pub updates: u64,
    pub skipped_updates: u64,
    /// Steps whose write-backs were all made durable (Durability::Step) .
    pub steps_synced: u64,
    pub staging_peak_bytes: u64,
}

#[derive(Default)]
struct Counters {
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    read_ops: AtomicU64,
    write_ops: AtomicU64,
    syncs: AtomicU64,
    sync_ns: AtomicU64,
    adam_ns: AtomicU64,
    wait_ns: AtomicU64,
    busy_ns: AtomicU64,
    read_busy_ns: AtomicU64,
    write_busy_ns: AtomicU64,
    updates: AtomicU64,
    skipped: AtomicU64,
    steps_synced: AtomicU64,
    staging_peak: AtomicU64,
}

fn add(c: &AtomicU64, v: u64) {
    c.fetch_add(v, Ordering::Relaxed);
}

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

/// What the tier is, for reports.
#[derive(Clone, Debug, Serialize)]
pub struct TierInfo {
    pub dir: String,
    pub backend: String,
    /// Why this back end (empty when io_uring ran as asked).
    pub backend_note: String,
    pub direct_io: bool,
    pub durability: Durability,
    pub staging_bytes: usize,
    pub landing_slots: usize,
    pub file_bytes: u64,
    pub layers: usize,
    pub chunk_bytes: usize,
    pub queue_depth: usize,
    pub prealloc_note: String,
}

enum Msg {
    Begin { order: Vec<usize>, disk_grad: bool },
    Update { job: UpdateJob, adam_done: Arc<Completion>, io_done: Arc<Completion> },
    Land { layer: usize, ptr: usize, copy_from: usize, cuda_event: Option<(u64, i32)>, slot: Option<usize>, done: Arc<Completion> },
    Cancel,
    Flush(Arc<Completion>),
    Misc { layer: usize, kind: MiscKind, done: Arc<Completion> },
    Ready(u64, Result<(), String>),
    Io(u64, Result<(), String>),
    Shutdown,
}

#[derive(Clone, Copy, Debug)]
enum MiscKind {
    Write([PartSrc; 3]),
    Read([usize; 3]),
    Refresh { w_bf16: usize, p_copy: usize },
}

/// The caller's handle. Dropping it finishes the I/O in flight, then removes the files.
pub struct DiskTier {
    tx: Sender<Msg>,
    worker: Option<std::thread::JoinHandle<()>>,
    files: Arc<TierFiles>,
    landing: Arc<SlotRing>,
    counters: Arc<Counters>,
    info: TierInfo,
}

impl DiskTier {
    /// Creates the files under `dir` (see `files`), maps the staging memory and starts the
    /// runtime. `numels`: elements of each layer, in the engine's layer order; `with_grad`:
    /// room for the step's gradient in each file (clipping); `direct`: O_DIRECT.
    pub fn new(dir: &Path, numels: &[usize], with_grad: bool, direct: bool, opts: &TierOptions) -> Result<DiskTier, String> {
        if numels.is_empty() {
            return Err("the disk tier needs at least one layer".into());
        }
        let layouts: Vec<LayerLayout> = numels.iter().map(|&n| LayerLayout::new(n, with_grad)).collect();
        let need = layouts.iter().map(|l| l.file_bytes()).max().unwrap_or(0);
        if opts.staging_bytes < need {
            return Err(format!(
                "disk tier staging budget of {} bytes is below the largest layer's {need} bytes",
                opts.staging_bytes
            ));
        }
        let files = Arc::new(TierFiles::create(dir, &layouts, direct)?);
        let region = HostRegion::map(opts.staging_bytes, &RegionOptions { numa_node: opts.numa_node, huge_pages: true, prefault: true })
            .map_err(|e| format!("disk tier staging memory: {}", e.0))?;
        let (tx, rx) = channel::<Msg>();
        let sink_tx = Mutex::new(tx.clone());
        let sink: io::Sink = Arc::new(move |token, r| {
            let _ = sink_tx.lock().unwrap_or_else(|p| p.into_inner()).send(Msg::Io(token, r));
        });
        let (backend, note) = io::open(opts.io, opts.io_config, sink)?;
        let landing = Arc::new(SlotRing::new(opts.landing_slots.max(1)));
        let counters = Arc::new(Counters::default());
        let info = TierInfo {
            dir: dir.display().to_string(),
            backend: backend.name().to_string(),
            backend_note: note,
            direct_io: direct,
            durability: opts.durability,
            staging_bytes: region.len(),
            landing_slots: opts.landing_slots.max(1),
            file_bytes: files.total_bytes(),
            layers: layouts.len(),
            chunk_bytes: opts.io_config.chunk_bytes,
            queue_depth: opts.io_config.queue_depth,
            prealloc_note: files.prealloc_note.clone(),
        };
        let ready = spawn_ready_thread(tx.clone());
        let mut rt = Runtime {
            files: files.clone(),
            layouts,
            backend: Some(backend),
            ring: StagingRing::new(region.len()),
            base: region.as_ptr() as usize,
            staging: Some(region),
            durability: opts.durability,
            landing: landing.clone(),
            counters: counters.clone(),
            ready,
            next_id: 1,
            entries: BTreeMap::new(),
            to_read: VecDeque::new(),
            pending: HashMap::new(),
            awaiting: HashMap::new(),
            lands: HashMap::new(),
            misc: HashMap::new(),
            misc_queue: VecDeque::new(),
            layer_writes: vec![0; numels.len()],
            grad_writes: vec![0; numels.len()],
            writes_inflight: 0,
            syncs_inflight: 0,
            sync_groups: HashMap::new(),
            dirty: HashSet::new(),
            steps: BTreeMap::new(),
            gen: 0,
            flush_waiters: Vec::new(),
            error: None,
            busy: [Busy::default(); 3],
            shutting_down: false,
        };
        let worker = std::thread::Builder::new()
            .name("horizon-tier".into())
            .spawn(move || rt.run(rx))
            .map_err(|e| format!("spawning the disk tier thread failed: {e}"))?;
        Ok(DiskTier { tx, worker: Some(worker), files, landing, counters, info })
    }

    fn send(&self, m: Msg) -> bool {
        self.tx.send(m).is_ok()
    }

    fn check_layer(&self, layer: usize) -> Result<(), String> {
        if layer >= self.info.layers {
            return Err(format!("layer {layer} out of range (the tier holds {} layers)", self.info.layers));
        }
        Ok(())
    }

    /// Starts a step whose updates come in `order` (layer indices); leftovers of an earlier
    /// step that never got their update are dropped. `disk_grad`: the gradients come from the
    /// files (clipping).
    pub fn begin_step(&self, order: Vec<usize>, disk_grad: bool) -> Result<(), String> {
        for &l in &order {
            self.check_layer(l)?;
        }
        if disk_grad && !self.files.layouts()[0].with_grad {
            return Err("this tier was made without gradient parts (with_grad=False)".into());
        }
        self.send(Msg::Begin { order, disk_grad });
        Ok(())
    }

    /// Queues one layer's AdamW; returns (adam_done: compute copy written, io_done: state
    /// durable on disk).
    pub fn update(&self, job: UpdateJob) -> Result<(Arc<Completion>, Arc<Completion>), String> {
        self.check_layer(job.layer)?;
        if matches!(job.grad, GradSource::Disk) && !self.files.layouts()[job.layer].with_grad {
            return Err("this tier was made without gradient parts (with_grad=False)".into());
        }
        let (a, b) = (Completion::new(), Completion::new());
        if !self.send(Msg::Update { job, adam_done: a.clone(), io_done: b.clone() }) {
            return Ok((Completion::done_with(Err("disk tier closed".into())), Completion::done_with(Err("disk tier closed".into()))));
        }
        Ok((a, b))
    }

    /// Writes a layer's step gradient from a landing buffer into its file (clipping).
    pub fn land(&self, layer: usize, ptr: usize, copy_from: usize, cuda_event: Option<(u64, i32)>, slot: Option<usize>) -> Result<Arc<Completion>, String> {
        self.check_layer(layer)?;
        if !self.files.layouts()[layer].with_grad {
            return Err("this tier was made without gradient parts (with_grad=False)".into());
        }
        let done = Completion::new();
        if !self.send(Msg::Land { layer, ptr, copy_from, cuda_event, slot, done: done.clone() }) {
            return Ok(Completion::done_with(Err("disk tier closed".into())));
        }
        Ok(done)
    }

    /// Drops the read-ahead of layers whose update never came (a skipped step).
    pub fn cancel(&self) {
        self.send(Msg::Cancel);
    }

    /// Done once everything queued before is durable on disk.
    pub fn flush(&self) -> Arc<Completion> {
        let c = Completion::new();
        if !self.send(Msg::Flush(c.clone())) {
            return Completion::done_with(Err("disk tier closed".into()));
        }
        c
    }

    fn misc(&self, layer: usize, kind: MiscKind) -> Result<Arc<Completion>, String> {
        self.check_layer(layer)?;
        let c = Completion::new();
        if !self.send(Msg::Misc { layer, kind, done: c.clone() }) {
            return Ok(Completion::done_with(Err("disk tier closed".into())));
        }
        Ok(c)
    }

    /// Writes parts of a layer's state (master, exp_avg, exp_avg_sq) from host buffers.
    pub fn write_state(&self, layer: usize, src: [PartSrc; 3]) -> Result<Arc<Completion>, String> {
        self.misc(layer, MiscKind::Write(src))
    }

    /// Reads parts of a layer's state into host buffers of `numel` f32 (0: skip the part).
    pub fn read_state(&self, layer: usize, dst: [usize; 3]) -> Result<Arc<Completion>, String> {
        self.misc(layer, MiscKind::Read(dst))
    }

    /// Rewrites a layer's compute copy (bf16 and/or fp32, 0: none) from its master on disk.
    pub fn refresh(&self, layer: usize, w_bf16: usize, p_copy: usize) -> Result<Arc<Completion>, String> {
        self.misc(layer, MiscKind::Refresh { w_bf16, p_copy })
    }

    pub fn landing(&self) -> &Arc<SlotRing> {
        &self.landing
    }

    pub fn layouts(&self) -> &[LayerLayout] {
        self.files.layouts()
    }

    pub fn layer_path(&self, layer: usize) -> PathBuf {
        self.files.layer_path(layer)
    }

    pub fn info(&self) -> &TierInfo {
        &self.info
    }

    pub fn stats(&self) -> TierStats {
        let c = &self.counters;
        let f = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let s = |a: &AtomicU64| f(a) as f64 * 1e-9;
        TierStats {
            bytes_read: f(&c.bytes_read),
            bytes_written: f(&c.bytes_written),
            read_ops: f(&c.read_ops),
            write_ops: f(&c.write_ops),
            syncs: f(&c.syncs),
            sync_seconds: s(&c.sync_ns),
            adam_seconds: s(&c.adam_ns),
            update_wait_seconds: s(&c.wait_ns),
            io_busy_seconds: s(&c.busy_ns),
            read_busy_seconds: s(&c.read_busy_ns),
            write_busy_seconds: s(&c.write_busy_ns),
            updates: f(&c.updates),
            skipped_updates: f(&c.skipped),
            steps_synced: f(&c.steps_synced),
            staging_peak_bytes: f(&c.staging_peak),
        }
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        self.send(Msg::Shutdown);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Waits for CUDA events and makes CPU landing copies off the runtime thread.
struct ReadyReq {
    key: u64,
    event: Option<(u64, i32)>,
    copy: Option<(usize, usize, usize)>,
}

fn spawn_ready_thread(tx: Sender<Msg>) -> Sender<ReadyReq> {
    let (rtx, rrx): (Sender<ReadyReq>, Receiver<ReadyReq>) = channel();
    std::thread::Builder::new()
        .name("horizon-tier-landing".into())
        .spawn(move || {
            while let Ok(r) = rrx.recv() {
                let mut res = Ok(());
                if let Some((event, device)) = r.event {
                    res = crate::cuda::event_synchronize(event, device).map_err(|e| format!("waiting for a gradient copy: {e}"));
                }
                if res.is_ok() {
                    if let Some((src, dst, bytes)) = r.copy {
                        // SAFETY: the caller keeps both buffers alive and unshared until the
                        // job that asked for this copy is done.
                        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes) };
                    }
                }
                if tx.send(Msg::Ready(r.key, res)).is_err() {
                    return;
                }
            }
        })
        .expect("spawning the disk tier landing thread");
    rtx
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    NotIssued,
    Issued,
    Done,
}

struct Pending {
    job: UpdateJob,
    adam_done: Arc<Completion>,
    io_done: Arc<Completion>,
    arrived: Instant,
}

struct Entry {
    /// The `begin_step` this entry belongs to.
    gen: u64,
    layer: usize,
    off: Option<usize>,
    disk_grad: bool,
    state: Phase,
    grad: Phase,
    grad_ready: bool,
    job: Option<Pending>,
    cancelled: bool,
}

struct Land {
    layer: usize,
    ptr: usize,
    slot: Option<usize>,
    done: Arc<Completion>,
}

struct Misc {
    layer: usize,
    kind: MiscKind,
    done: Arc<Completion>,
    off: Option<usize>,
    outstanding: usize,
    err: Option<String>,
}

enum Purpose {
    StateRead(u64),
    GradRead(u64),
    StateWrite { layer: usize, off: usize, gen: u64, io_done: Arc<Completion> },
    GradWrite(u64),
    Sync { group: u64, start: Instant },
    Misc { id: u64, write: bool },
}

enum ReadyFor {
    Entry(u64),
    Land(u64),
}

/// Durability::Step: the write-backs of one step, synced together once the step is complete.
#[derive(Default)]
struct StepWrites {
    layers: HashSet<usize>,
    waiters: Vec<Arc<Completion>>,
    writes: usize,
}

/// Requests of one kind in flight, and since when (for the busy-time counters).
#[derive(Clone, Copy, Default)]
struct Busy {
    n: usize,
    since: Option<Instant>,
}

impl Busy {
    fn start(&mut self, now: Instant) {
        if self.n == 0 {
            self.since = Some(now);
        }
        self.n += 1;
    }

    fn end(&mut self, counter: &AtomicU64) {
        self.n = self.n.saturating_sub(1);
        if self.n == 0 {
            if let Some(t) = self.since.take() {
                add(counter, ns(t.elapsed()));
            }
        }
    }
}

struct SyncGroup {
    remaining: usize,
    waiters: Vec<Arc<Completion>>,
    step: bool,
}

struct Runtime {
    files: Arc<TierFiles>,
    layouts: Vec<LayerLayout>,
    backend: Option<Box<dyn Backend>>,
    ring: StagingRing,
    base: usize,
    staging: Option<HostRegion>,
    durability: Durability,
    landing: Arc<SlotRing>,
    counters: Arc<Counters>,
    ready: Sender<ReadyReq>,
    next_id: u64,
    /// Layers of the current (and an unfinished earlier) step, by id = update order.
    entries: BTreeMap<u64, Entry>,
    /// Entries whose state read is not issued yet, in order.
    to_read: VecDeque<u64>,
    /// What each I/O token is for.
    pending: HashMap<u64, Purpose>,
    /// Landing buffers waited for (event / copy), by key.
    awaiting: HashMap<u64, ReadyFor>,
    lands: HashMap<u64, Land>,
    misc: HashMap<u64, Misc>,
    misc_queue: VecDeque<u64>,
    /// Write operations in flight per layer (state) and per layer (gradient part).
    layer_writes: Vec<u32>,
    grad_writes: Vec<u32>,
    writes_inflight: usize,
    syncs_inflight: usize,
    sync_groups: HashMap<u64, SyncGroup>,
    /// Files written by init / load transfers since their last fdatasync (synced on flush).
    dirty: HashSet<usize>,
    /// Durability::Step: per step generation, the write-backs to sync.
    steps: BTreeMap<u64, StepWrites>,
    gen: u64,
    flush_waiters: Vec<Arc<Completion>>,
    error: Option<String>,
    /// Requests in flight and since when: all, reads, writes.
    busy: [Busy; 3],
    shutting_down: bool,
}

impl Runtime {
    fn run(&mut self, rx: Receiver<Msg>) {
        while let Ok(m) = rx.recv() {
            self.handle(m);
            while let Ok(m) = rx.try_recv() {
                self.handle(m);
            }
            if self.error.is_none() {
                self.pump();
            }
            if self.shutting_down && self.pending.is_empty() && self.awaiting.is_empty() {
                break;
            }
        }
        // Nothing of ours is in flight any more: fail what never ran, stop the back end (its
        // threads end), then unmap the staging memory. The files go with the last handle.
        self.fail("disk tier closed");
        self.backend.take();
        self.staging.take();
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn layout(&self, layer: usize) -> LayerLayout {
        self.layouts[layer]
    }

    fn submit(&mut self, kind: OpKind, layer: usize, buf: usize, len: usize, offset: usize, purpose: Purpose) {
        let token = self.id();
        match kind {
            OpKind::Read => {
                add(&self.counters.bytes_read, len as u64);
                add(&self.counters.read_ops, 1);
            }
            OpKind::Write => {
                add(&self.counters.bytes_written, len as u64);
                add(&self.counters.write_ops, 1);
                self.writes_inflight += 1;
            }
            OpKind::Sync => {
                add(&self.counters.syncs, 1);
                self.syncs_inflight += 1;
            }
        }
        self.pending.insert(token, purpose);
        let now = Instant::now();
        self.busy[0].start(now);
        match kind {
            OpKind::Read => self.busy[1].start(now),
            OpKind::Write => self.busy[2].start(now),
            OpKind::Sync => {}
        }
        let op = Op { kind, fd: self.files.fd(layer), buf, len, offset: offset as u64, token };
        if let Some(b) = self.backend.as_ref() {
            b.submit(&[op]);
        }
    }

    fn alloc(&mut self, len: usize) -> Option<usize> {
        let off = self.ring.alloc(len)?;
        self.counters.staging_peak.fetch_max(self.ring.used() as u64, Ordering::Relaxed);
        Some(off)
    }

    fn release_slot(&self, slot: Option<usize>) {
        if let Some(s) = slot {
            let _ = self.landing.release(s);
        }
    }

    /// Fails everything pending with `msg`; the tier accepts no more work.
    fn fail(&mut self, msg: &str) {
        if self.error.is_none() {
            self.error = Some(msg.to_string());
        }
        let msg = self.error.clone().unwrap_or_default();
        let entries = std::mem::take(&mut self.entries);
        for (_, e) in entries {
            if let Some(p) = e.job {
                if let GradSource::Landing { slot, .. } = p.job.grad {
                    self.release_slot(slot);
                }
                p.adam_done.complete(Err(msg.clone()));
                p.io_done.complete(Err(msg.clone()));
            }
        }
        self.to_read.clear();
        for (_, l) in std::mem::take(&mut self.lands) {
            self.release_slot(l.slot);
            l.done.complete(Err(msg.clone()));
        }
        for (_, m) in std::mem::take(&mut self.misc) {
            m.done.complete(Err(msg.clone()));
        }
        self.misc_queue.clear();
        for (_, p) in std::mem::take(&mut self.pending) {
            if let Purpose::StateWrite { io_done, .. } = p {
                io_done.complete(Err(msg.clone()));
            }
        }
        for (_, g) in std::mem::take(&mut self.sync_groups) {
            for w in g.waiters {
                w.complete(Err(msg.clone()));
            }
        }
        for (_, st) in std::mem::take(&mut self.steps) {
            for w in st.waiters {
                w.complete(Err(msg.clone()));
            }
        }
        for w in self.flush_waiters.drain(..) {
            w.complete(Err(msg.clone()));
        }
    }

    fn handle(&mut self, m: Msg) {
        if let Some(err) = self.error.clone() {
            // Failed: answer at once, but keep collecting completions of requests in flight.
            match m {
                Msg::Update { job, adam_done, io_done } => {
                    if let GradSource::Landing { slot, .. } = job.grad {
                        self.release_slot(slot);
                    }
                    adam_done.complete(Err(err.clone()));
                    io_done.complete(Err(err));
                }
                Msg::Land { slot, done, .. } => {
                    self.release_slot(slot);
                    done.complete(Err(err));
                }
                Msg::Flush(c) | Msg::Misc { done: c, .. } => c.complete(Err(err)),
                Msg::Io(token, _) => {
                    if let Some(p) = self.pending.remove(&token) {
                        self.io_finished(&p);
                    }
                }
                Msg::Ready(key, _) => {
                    self.awaiting.remove(&key);
                }
                Msg::Shutdown => self.shutting_down = true,
                Msg::Begin { .. } | Msg::Cancel => {}
            }
            return;
        }
        match m {
            Msg::Begin { order, disk_grad } => {
                self.cancel();
                self.gen += 1;
                for layer in order {
                    let id = self.id();
                    let e = Entry { gen: self.gen, layer, off: None, disk_grad, state: Phase::NotIssued, grad: if disk_grad { Phase::NotIssued } else { Phase::Done }, grad_ready: disk_grad, job: None, cancelled: false };
                    self.entries.insert(id, e);
                    self.to_read.push_back(id);
                }
            }
            Msg::Update { job, adam_done, io_done } => self.attach(job, adam_done, io_done),
            Msg::Land { layer, ptr, copy_from, cuda_event, slot, done } => {
                let key = self.id();
                // Counted from now, not from the write: a gradient read of this layer must wait
                // for the landing copy too.
                self.grad_writes[layer] += 1;
                self.lands.insert(key, Land { layer, ptr, slot, done });
                let bytes = self.layout(layer).numel * 4;
                self.await_ready(key, ReadyFor::Land(key), cuda_event, copy_from, ptr, bytes);
            }
            Msg::Cancel => self.cancel(),
            Msg::Flush(c) => self.flush_waiters.push(c),
            Msg::Misc { layer, kind, done } => {
                // The caller's state changes under any read-ahead: drop it.
                self.cancel();
                let id = self.id();
                self.misc.insert(id, Misc { layer, kind, done, off: None, outstanding: 0, err: None });
                self.misc_queue.push_back(id);
            }
            Msg::Ready(key, r) => self.on_ready(key, r),
            Msg::Io(token, r) => self.on_io(token, r),
            Msg::Shutdown => {
                self.shutting_down = true;
                self.cancel();
            }
        }
    }

    fn io_finished(&mut self, purpose: &Purpose) {
        let c = self.counters.clone();
        self.busy[0].end(&c.busy_ns);
        match purpose {
            Purpose::StateRead(_) | Purpose::GradRead(_) | Purpose::Misc { write: false, .. } => self.busy[1].end(&c.read_busy_ns),
            Purpose::StateWrite { .. } | Purpose::GradWrite(_) | Purpose::Misc { write: true, .. } => self.busy[2].end(&c.write_busy_ns),
            Purpose::Sync { .. } => {}
        }
    }

    /// Asks the landing thread to make a landing buffer ready, or marks it ready now.
    fn await_ready(&mut self, key: u64, what: ReadyFor, event: Option<(u64, i32)>, copy_from: usize, dst: usize, bytes: usize) {
        if event.is_none() && copy_from == 0 {
            self.awaiting.insert(key, what);
            self.on_ready(key, Ok(()));
            return;
        }
        self.awaiting.insert(key, what);
        let copy = (copy_from != 0).then_some((copy_from, dst, bytes));
        if self.ready.send(ReadyReq { key, event, copy }).is_err() {
            self.on_ready(key, Err("the landing thread ended".into()));
        }
    }

    fn on_ready(&mut self, key: u64, r: Result<(), String>) {
        let Some(what) = self.awaiting.remove(&key) else { return };
        if let Err(e) = r {
            self.fail(&e);
            return;
        }
        match what {
            ReadyFor::Entry(id) => {
                if let Some(e) = self.entries.get_mut(&id) {
                    e.grad_ready = true;
                }
            }
            ReadyFor::Land(k) => {
                let Some(l) = self.lands.get(&k) else { return };
                let (layer, ptr) = (l.layer, l.ptr);
                let lay = self.layout(layer);
                self.submit(OpKind::Write, layer, ptr, lay.part_bytes, lay.part_offset(GRAD), Purpose::GradWrite(k));
            }
        }
    }

    fn attach(&mut self, job: UpdateJob, adam_done: Arc<Completion>, io_done: Arc<Completion>) {
        let found = self.entries.iter().find(|(_, e)| e.layer == job.layer && e.job.is_none() && !e.cancelled).map(|(&id, _)| id);
        let id = match found {
            Some(id) => id,
            None => {
                // An update the step did not announce: read it on demand, after the others.
                let id = self.id();
                let disk = matches!(job.grad, GradSource::Disk);
                let e = Entry { gen: self.gen, layer: job.layer, off: None, disk_grad: disk, state: Phase::NotIssued, grad: if disk { Phase::NotIssued } else { Phase::Done }, grad_ready: disk, job: None, cancelled: false };
                self.entries.insert(id, e);
                self.to_read.push_back(id);
                id
            }
        };
        let numel = self.layout(job.layer).numel;
        let e = self.entries.get_mut(&id).expect("entry just found");
        match job.grad {
            GradSource::Disk => {
                if !e.disk_grad {
                    // Announced for a landing gradient: this entry's staging has no gradient
                    // part. Cannot happen with the engine's schedules; refuse loudly.
                    let msg = format!("layer {}: update from the disk gradient in a step begun without disk gradients", job.layer);
                    adam_done.complete(Err(msg.clone()));
                    io_done.complete(Err(msg));
                    return;
                }
                e.grad_ready = true;
            }
            GradSource::Landing { .. } => {
                e.grad = Phase::Done;
                e.grad_ready = false;
            }
        }
        e.job = Some(Pending { job, adam_done, io_done, arrived: Instant::now() });
        if let GradSource::Landing { ptr, copy_from, cuda_event, .. } = job.grad {
            self.await_ready(id, ReadyFor::Entry(id), cuda_event, copy_from, ptr, numel * 4);
        }
    }

    fn cancel(&mut self) {
        let ids: Vec<u64> = self.entries.iter().filter(|(_, e)| e.job.is_none()).map(|(&id, _)| id).collect();
        for id in ids {
            let e = self.entries.get_mut(&id).expect("listed");
            let busy = e.state == Phase::Issued || e.grad == Phase::Issued;
            if busy {
                e.cancelled = true; // freed when its read completes
            } else {
                let off = e.off;
                self.entries.remove(&id);
                if let Some(off) = off {
                    self.ring.free(off);
                }
            }
        }
        let entries = &self.entries;
        self.to_read.retain(|id| entries.get(id).is_some_and(|e| !e.cancelled));
    }

    fn on_io(&mut self, token: u64, r: Result<(), String>) {
        let Some(purpose) = self.pending.remove(&token) else { return };
        self.io_finished(&purpose);
        if let Purpose::Sync { .. } = purpose {
            self.syncs_inflight -= 1;
        }
        if matches!(purpose, Purpose::StateWrite { .. } | Purpose::GradWrite(_)) || matches!(purpose, Purpose::Misc { write: true, .. }) {
            self.writes_inflight -= 1;
        }
        if let Err(e) = r {
            let what = match &purpose {
                Purpose::StateRead(id) | Purpose::GradRead(id) => self.entries.get(id).map(|e| e.layer),
                Purpose::StateWrite { layer, .. } => Some(*layer),
                Purpose::GradWrite(k) => self.lands.get(k).map(|l| l.layer),
                Purpose::Misc { id, .. } => self.misc.get(id).map(|m| m.layer),
                Purpose::Sync { .. } => None,
            };
            let path = what.map(|l| self.files.layer_path(l).display().to_string()).unwrap_or_else(|| self.files.dir().display().to_string());
            self.fail(&format!("disk tier I/O on {path}: {e}"));
            return;
        }
        match purpose {
            Purpose::StateRead(id) => {
                if let Some(e) = self.entries.get_mut(&id) {
                    e.state = Phase::Done;
                }
                self.reap_cancelled(id);
            }
            Purpose::GradRead(id) => {
                if let Some(e) = self.entries.get_mut(&id) {
                    e.grad = Phase::Done;
                }
                self.reap_cancelled(id);
            }
            Purpose::StateWrite { layer, off, gen, io_done } => {
                self.layer_writes[layer] -= 1;
                self.ring.free(off);
                self.after_write(layer);
                match self.durability {
                    Durability::Layer => self.sync_files(vec![layer], vec![io_done], false),
                    Durability::Step => {
                        let st = self.steps.entry(gen).or_default();
                        st.writes -= 1;
                        st.layers.insert(layer);
                        st.waiters.push(io_done);
                    }
                }
            }
            Purpose::GradWrite(k) => {
                if let Some(l) = self.lands.remove(&k) {
                    self.grad_writes[l.layer] -= 1;
                    self.release_slot(l.slot);
                    l.done.complete(Ok(()));
                }
            }
            Purpose::Sync { group, start } => {
                add(&self.counters.sync_ns, ns(start.elapsed()));
                let done = if let Some(g) = self.sync_groups.get_mut(&group) {
                    g.remaining -= 1;
                    g.remaining == 0
                } else {
                    false
                };
                if done {
                    let g = self.sync_groups.remove(&group).expect("present");
                    if g.step {
                        add(&self.counters.steps_synced, 1);
                    }
                    for w in g.waiters {
                        w.complete(Ok(()));
                    }
                }
            }
            Purpose::Misc { id, write } => {
                if let Some(m) = self.misc.get(&id) {
                    if write {
                        self.layer_writes[m.layer] -= 1;
                    }
                }
                self.misc_step(id);
            }
        }
    }

    /// Buffered I/O leaves the written state in the page cache: let it go.
    fn after_write(&self, layer: usize) {
        if !self.files.direct() {
            // SAFETY: advice on our own descriptor.
            unsafe { libc::posix_fadvise(self.files.fd(layer), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }

    fn reap_cancelled(&mut self, id: u64) {
        let Some(e) = self.entries.get(&id) else { return };
        if e.cancelled && e.state != Phase::Issued && e.grad != Phase::Issued {
            let off = e.off;
            self.entries.remove(&id);
            if let Some(off) = off {
                self.ring.free(off);
            }
        }
    }

    fn pump(&mut self) {
        self.pump_misc();
        if self.misc_queue.is_empty() {
            self.pump_reads();
        }
        self.pump_grad_reads();
        self.pump_compute();
        self.pump_sync();
    }

    fn pump_reads(&mut self) {
        while let Some(&id) = self.to_read.front() {
            let Some(e) = self.entries.get(&id) else {
                self.to_read.pop_front();
                continue;
            };
            let layer = e.layer;
            if self.layer_writes[layer] > 0 {
                break; // read after the previous write of this layer, and keep the order
            }
            let lay = self.layout(layer);
            let need = if e.disk_grad { lay.file_bytes() } else { lay.state_bytes() };
            let Some(off) = self.alloc(need) else { break };
            self.to_read.pop_front();
            let e = self.entries.get_mut(&id).expect("present");
            e.off = Some(off);
            e.state = Phase::Issued;
            self.submit(OpKind::Read, layer, self.base + off, lay.state_bytes(), 0, Purpose::StateRead(id));
        }
    }

    fn pump_grad_reads(&mut self) {
        let ready: Vec<(u64, usize, usize)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.disk_grad && e.job.is_some() && e.grad == Phase::NotIssued && e.off.is_some() && self.grad_writes[e.layer] == 0)
            .map(|(&id, e)| (id, e.layer, e.off.unwrap()))
            .collect();
        for (id, layer, off) in ready {
            let lay = self.layout(layer);
            self.entries.get_mut(&id).expect("present").grad = Phase::Issued;
            self.submit(OpKind::Read, layer, self.base + off + lay.part_offset(GRAD), lay.part_bytes, lay.part_offset(GRAD), Purpose::GradRead(id));
        }
    }

    fn pump_compute(&mut self) {
        loop {
            let next = self
                .entries
                .iter()
                .find(|(_, e)| e.job.is_some() && e.state == Phase::Done && e.grad == Phase::Done && e.grad_ready)
                .map(|(&id, _)| id);
            let Some(id) = next else { break };
            let e = self.entries.remove(&id).expect("present");
            self.compute(e);
        }
    }

    fn compute(&mut self, e: Entry) {
        let Pending { job, adam_done, io_done, arrived } = e.job.expect("has a job");
        let off = e.off.expect("read into staging");
        let lay = self.layout(e.layer);
        let n = lay.numel;
        let base = self.base + off;
        let at = move |part: usize| base + lay.part_offset(part);
        let (g_ptr, slot) = match job.grad {
            GradSource::Landing { ptr, slot, .. } => (ptr, slot),
            GradSource::Disk => (at(GRAD), None),
        };
        add(&self.counters.wait_ns, ns(arrived.elapsed()));
        // SAFETY: the staging parts are ours (this entry's block); the gradient, compute-copy
        // buffers are live and unshared until the completions below fire (the caller's
        // contract), and the bindings checked them for size and alignment.
        let (p, m, v, g) = unsafe {
            (
                std::slice::from_raw_parts_mut(at(MASTER) as *mut f32, n),
                std::slice::from_raw_parts_mut(at(EXP_AVG) as *mut f32, n),
                std::slice::from_raw_parts_mut(at(EXP_AVG_SQ) as *mut f32, n),
                std::slice::from_raw_parts(g_ptr as *const f32, n),
            )
        };
        if job.skip_nonfinite && !adam::all_finite(g) {
            add(&self.counters.skipped, 1);
            self.release_slot(slot);
            self.ring.free(off);
            adam_done.complete(Ok(()));
            io_done.complete(Ok(()));
            return;
        }
        let t = Instant::now();
        // SAFETY: as above.
        let w = (job.w_bf16 != 0).then(|| unsafe { std::slice::from_raw_parts_mut(job.w_bf16 as *mut u16, n) });
        adam::adamw_step(p, g, m, v, w, &job.hp.hyper, job.hp.step, job.hp.grad_scale);
        if job.p_copy != 0 {
            // SAFETY: as above; the copy is disjoint from staging.
            unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), job.p_copy as *mut f32, n) };
        }
        add(&self.counters.adam_ns, ns(t.elapsed()));
        add(&self.counters.updates, 1);
        self.release_slot(slot);
        adam_done.complete(Ok(()));
        self.layer_writes[e.layer] += 1;
        if self.durability == Durability::Step {
            self.steps.entry(e.gen).or_default().writes += 1;
        }
        self.submit(OpKind::Write, e.layer, at(MASTER), lay.state_bytes(), 0, Purpose::StateWrite { layer: e.layer, off, gen: e.gen, io_done });
    }

    /// fdatasync of each file of `layers` (in parallel); the waiters complete after the last.
    fn sync_files(&mut self, layers: Vec<usize>, waiters: Vec<Arc<Completion>>, step: bool) {
        if layers.is_empty() {
            for w in waiters {
                w.complete(Ok(()));
            }
            return;
        }
        let g = self.id();
        self.sync_groups.insert(g, SyncGroup { remaining: layers.len(), waiters, step });
        for l in layers {
            self.submit(OpKind::Sync, l, 0, 0, 0, Purpose::Sync { group: g, start: Instant::now() });
        }
    }

    /// Durability::Step: syncs a step's files once all its updates are written (at once when
    /// a flush waits). Completes flushes once nothing queued before them is left.
    fn pump_sync(&mut self) {
        let flushing = !self.flush_waiters.is_empty();
        let gens: Vec<u64> = self.steps.keys().copied().collect();
        for g in gens {
            if self.steps[&g].writes > 0 {
                continue;
            }
            let open = self.entries.values().any(|e| e.gen == g && (e.job.is_some() || !e.cancelled));
            if open && !flushing {
                continue;
            }
            let st = self.steps.remove(&g).expect("listed");
            self.sync_files(st.layers.into_iter().collect(), st.waiters, true);
        }
        if !flushing {
            return;
        }
        let quiet = self.writes_inflight == 0
            && self.misc.is_empty()
            && self.lands.is_empty()
            && self.steps.is_empty()
            && !self.entries.values().any(|e| e.job.is_some());
        if !quiet {
            return;
        }
        if !self.dirty.is_empty() {
            let layers: Vec<usize> = self.dirty.drain().collect();
            self.sync_files(layers, Vec::new(), false);
        }
        if self.syncs_inflight == 0 {
            for w in self.flush_waiters.drain(..) {
                w.complete(Ok(()));
            }
        }
    }

    fn pump_misc(&mut self) {
        while let Some(&id) = self.misc_queue.front() {
            let (layer, kind) = {
                let m = &self.misc[&id];
                (m.layer, m.kind)
            };
            if self.layer_writes[layer] > 0 {
                break; // after the layer's write-back in flight, whatever this job does
            }
            let lay = self.layout(layer);
            let Some(off) = self.alloc(lay.state_bytes()) else { break };
            self.misc_queue.pop_front();
            let base = self.base + off;
            let n = lay.numel;
            let mut ops: Vec<(OpKind, usize, usize)> = Vec::new(); // (kind, part, len)
            match kind {
                MiscKind::Write(src) => {
                    for (part, s) in src.iter().enumerate() {
                        let dst = base + lay.part_offset(part);
                        // SAFETY: dst is this block's part; a source buffer holds n f32 and
                        // stays live until the completion (the caller's contract).
                        unsafe {
                            match *s {
                                PartSrc::Buf(src) => {
                                    std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, n * 4);
                                    std::ptr::write_bytes((dst + n * 4) as *mut u8, 0, lay.part_bytes - n * 4);
                                }
                                PartSrc::Zero => std::ptr::write_bytes(dst as *mut u8, 0, lay.part_bytes),
                                PartSrc::Keep => continue,
                            }
                        }
                        ops.push((OpKind::Write, part, lay.part_bytes));
                    }
                }
                MiscKind::Read(dst) => {
                    for (part, &d) in dst.iter().enumerate() {
                        if d != 0 {
                            ops.push((OpKind::Read, part, lay.part_bytes));
                        }
                    }
                }
                MiscKind::Refresh { .. } => ops.push((OpKind::Read, MASTER, lay.part_bytes)),
            }
            let m = self.misc.get_mut(&id).expect("present");
            m.off = Some(off);
            m.outstanding = ops.len();
            if ops.is_empty() {
                self.misc_step(id);
                continue;
            }
            for (k, part, len) in ops {
                let write = k == OpKind::Write;
                if write {
                    self.layer_writes[layer] += 1;
                    self.dirty.insert(layer);
                }
                self.submit(k, layer, base + lay.part_offset(part), len, lay.part_offset(part), Purpose::Misc { id, write });
            }
        }
    }

    /// One operation of a misc job finished (or it had none): finish the job after the last.
    fn misc_step(&mut self, id: u64) {
        let Some(m) = self.misc.get_mut(&id) else { return };
        if m.outstanding > 0 {
            m.outstanding -= 1;
        }
        if m.outstanding > 0 {
            return;
        }
        let m = self.misc.remove(&id).expect("present");
        let off = m.off.expect("allocated");
        let lay = self.layout(m.layer);
        let n = lay.numel;
        let base = self.base + off;
        // SAFETY: the staging block is ours; destination buffers hold n elements and stay live
        // until the completion (the caller's contract).
        unsafe {
            match m.kind {
                MiscKind::Write(_) => {}
                MiscKind::Read(dst) => {
                    for (part, &d) in dst.iter().enumerate() {
                        if d != 0 {
                            std::ptr::copy_nonoverlapping((base + lay.part_offset(part)) as *const u8, d as *mut u8, n * 4);
                        }
                    }
                }
                MiscKind::Refresh { w_bf16, p_copy } => {
                    let p = std::slice::from_raw_parts(base as *const f32, n);
                    if w_bf16 != 0 {
                        to_bf16(p, std::slice::from_raw_parts_mut(w_bf16 as *mut u16, n));
                    }
                    if p_copy != 0 {
                        std::ptr::copy_nonoverlapping(p.as_ptr(), p_copy as *mut f32, n);
                    }
                }
            }
        }
        if matches!(m.kind, MiscKind::Write(_)) {
            self.after_write(m.layer);
        }
        self.ring.free(off);
        m.done.complete(m.err.map_or(Ok(()), Err));
    }
}

/// bf16 (round to nearest even) of `p` into `w`, on the Adam pool for large layers.
fn to_bf16(p: &[f32], w: &mut [u16]) {
    use crate::cpu::{bf16::bf16_rne, pool};
    let n = p.len();
    let (pp, wp) = (p.as_ptr() as usize, w.as_mut_ptr() as usize);
    let one = |s: usize, e: usize| {
        for i in s..e {
            // SAFETY: i < n in both; the shards are disjoint.
            unsafe { *(wp as *mut u16).add(i) = bf16_rne(*(pp as *const f32).add(i)) };
        }
    };
    if n >= 1 << 15 {
        let pool = pool::global();
        let t = pool.threads();
        pool.run(&|k| {
            let (s, e) = pool::shard(n, t, k, 64);
            one(s, e)
        });
    } else {
        one(0, n);
    }
}
