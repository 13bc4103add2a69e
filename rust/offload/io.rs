//! Asynchronous file I/O for the disk tier. Two back ends with one interface: io_uring (one
//! thread owning the ring, up to `queue_depth` requests in flight) where the kernel allows it,
//! and a pool of threads doing `pread` / `pwrite` / `fdatasync` otherwise. `open` picks one at
//! run time and says why.
//!
//! An operation reads or writes one contiguous range of a file, or syncs a file. It is split
//! into chunks of `chunk_bytes` that run concurrently; the sink hears of the operation once,
//! when its last chunk is done, with Ok or the first chunk error.

use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Sync,
}

#[derive(Clone, Copy, Debug)]
pub struct Op {
    pub kind: OpKind,
    pub fd: RawFd,
    /// Host address of the buffer (reads land there, writes come from there).
    pub buf: usize,
    pub len: usize,
    pub offset: u64,
    /// The caller's name for the operation, handed back to the sink; unique among the
    /// operations in flight.
    pub token: u64,
}

/// Hears of each operation once: its token and Ok, or the first error of its chunks.
pub type Sink = Arc<dyn Fn(u64, Result<(), String>) + Send + Sync>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoChoice {
    /// io_uring when it works here, else threads.
    Auto,
    Uring,
    Threads,
}

impl IoChoice {
    pub fn parse(s: &str) -> Result<IoChoice, String> {
        match s {
            "auto" => Ok(IoChoice::Auto),
            "uring" | "io_uring" => Ok(IoChoice::Uring),
            "threads" => Ok(IoChoice::Threads),
            _ => Err(format!("I/O back end must be auto, uring or threads, got {s:?}")),
        }
    }
}

pub trait Backend: Send + Sync {
    /// Queues the operations; never blocks on the disk.
    fn submit(&self, ops: &[Op]);
    fn name(&self) -> &'static str;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn what(op: &Op) -> String {
    match op.kind {
        OpKind::Read => format!("read of {} bytes at offset {}", op.len, op.offset),
        OpKind::Write => format!("write of {} bytes at offset {}", op.len, op.offset),
        OpKind::Sync => "fdatasync".to_string(),
    }
}

fn os_error(code: i32) -> String {
    std::io::Error::from_raw_os_error(code).to_string()
}

/// Chunks outstanding per operation, and the first error seen.
struct OpTable {
    ops: Mutex<HashMap<u64, (usize, Option<String>)>>,
    sink: Sink,
}

impl OpTable {
    fn begin(&self, token: u64, chunks: usize) {
        let prev = lock(&self.ops).insert(token, (chunks, None));
        debug_assert!(prev.is_none(), "I/O token {token} is in use: tokens name one operation each");
    }

    fn finish(&self, token: u64, r: Result<(), String>) {
        let done = {
            let mut ops = lock(&self.ops);
            let Some(e) = ops.get_mut(&token) else { return };
            e.0 -= 1;
            if let Err(msg) = r {
                e.1.get_or_insert(msg);
            }
            if e.0 == 0 {
                ops.remove(&token).map(|(_, err)| err)
            } else {
                None
            }
        };
        if let Some(err) = done {
            (self.sink)(token, err.map_or(Ok(()), Err));
        }
    }
}

/// Splits `ops` into chunks and registers them; returns the chunks to run. Empty reads and
/// writes complete at once.
fn chunked(table: &OpTable, ops: &[Op], chunk: usize) -> Vec<Op> {
    let mut out = Vec::new();
    for op in ops {
        if op.kind == OpKind::Sync {
            table.begin(op.token, 1);
            out.push(*op);
            continue;
        }
        if op.len == 0 {
            (table.sink)(op.token, Ok(()));
            continue;
        }
        let n = op.len.div_ceil(chunk);
        table.begin(op.token, n);
        for k in 0..n {
            let at = k * chunk;
            out.push(Op { buf: op.buf + at, len: chunk.min(op.len - at), offset: op.offset + at as u64, ..*op });
        }
    }
    out
}

/// Runs one chunk to the end on the calling thread (short transfers continue, EINTR retries).
pub fn run_blocking(op: &Op) -> Result<(), String> {
    let mut done = 0usize;
    loop {
        // SAFETY: the submitter keeps the buffer (op.buf, op.len) live and unshared until the
        // operation completes; fd is open for as long.
        let r = unsafe {
            match op.kind {
                OpKind::Sync => libc::fdatasync(op.fd) as isize,
                OpKind::Read => libc::pread(op.fd, (op.buf + done) as *mut libc::c_void, op.len - done, (op.offset + done as u64) as libc::off_t),
                OpKind::Write => libc::pwrite(op.fd, (op.buf + done) as *const libc::c_void, op.len - done, (op.offset + done as u64) as libc::off_t),
            }
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(format!("{} failed: {e}", what(op)));
        }
        if op.kind == OpKind::Sync {
            return Ok(());
        }
        if r == 0 {
            return Err(format!("{} failed: unexpected end of file after {done} bytes", what(op)));
        }
        done += r as usize;
        if done >= op.len {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------------- threads

struct PoolShared {
    queue: Mutex<VecDeque<Op>>,
    cv: Condvar,
    shutdown: AtomicBool,
    table: OpTable,
}

/// `threads` workers, each running one chunk at a time with blocking syscalls.
pub struct ThreadPoolIo {
    shared: Arc<PoolShared>,
    handles: Vec<std::thread::JoinHandle<()>>,
    chunk: usize,
}

impl ThreadPoolIo {
    pub fn new(threads: usize, chunk: usize, sink: Sink) -> ThreadPoolIo {
        let shared = Arc::new(PoolShared {
            queue: Mutex::new(VecDeque::new()),
            cv: Condvar::new(),
            shutdown: AtomicBool::new(false),
            table: OpTable { ops: Mutex::new(HashMap::new()), sink },
        });
        let handles = (0..threads.max(1))
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("horizon-disk-{i}"))
                    .spawn(move || loop {
                        let op = {
                            let mut q = lock(&s.queue);
                            loop {
                                if let Some(op) = q.pop_front() {
                                    break op;
                                }
                                if s.shutdown.load(Ordering::Acquire) {
                                    return;
                                }
                                q = s.cv.wait(q).unwrap_or_else(|p| p.into_inner());
                            }
                        };
                        let r = run_blocking(&op);
                        s.table.finish(op.token, r);
                    })
                    .expect("spawning a disk I/O thread")
            })
            .collect();
        ThreadPoolIo { shared, handles, chunk }
    }
}

impl Backend for ThreadPoolIo {
    fn submit(&self, ops: &[Op]) {
        let chunks = chunked(&self.shared.table, ops, self.chunk);
        if chunks.is_empty() {
            return;
        }
        lock(&self.shared.queue).extend(chunks);
        self.shared.cv.notify_all();
    }
    fn name(&self) -> &'static str {
        "threads"
    }
}

impl Drop for ThreadPoolIo {
    fn drop(&mut self) {
        // Workers leave once the queue is empty: every submitted chunk still runs, so no buffer
        // is written after its owner was told the operation finished.
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _q = lock(&self.shared.queue);
            self.shared.cv.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------- io_uring

use io_uring::{opcode, squeue, types, IoUring};

const WAKE: u64 = u64::MAX;

struct UringShared {
    queue: Mutex<VecDeque<Op>>,
    /// eventfd the ring polls: a submitter writes it, the ring thread wakes.
    efd: RawFd,
    shutdown: AtomicBool,
    table: OpTable,
}

/// One thread owns the ring: it moves queued chunks into the submission queue (up to `depth`
/// in flight), waits for completions, continues short transfers and reports each operation.
pub struct UringIo {
    shared: Arc<UringShared>,
    handle: Option<std::thread::JoinHandle<()>>,
    chunk: usize,
}

fn entry_of(op: &Op, ud: u64) -> squeue::Entry {
    let fd = types::Fd(op.fd);
    match op.kind {
        OpKind::Read => opcode::Read::new(fd, op.buf as *mut u8, op.len as u32).offset(op.offset).build(),
        OpKind::Write => opcode::Write::new(fd, op.buf as *const u8, op.len as u32).offset(op.offset).build(),
        OpKind::Sync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
    }
    .user_data(ud)
}

impl UringIo {
    /// A ring of `depth` requests, or Err(why not): the kernel or a sandbox may refuse
    /// io_uring, or lack an opcode the tier uses.
    pub fn new(depth: usize, chunk: usize, sink: Sink) -> Result<UringIo, String> {
        let depth = depth.clamp(1, 1024);
        let entries = (depth as u32 + 1).next_power_of_two().max(8);
        let mut ring = IoUring::new(entries).map_err(|e| format!("io_uring_setup failed: {e}"))?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe).map_err(|e| format!("io_uring probe failed: {e}"))?;
        for (code, name) in [
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::Fsync::CODE, "FSYNC"),
            (opcode::PollAdd::CODE, "POLL_ADD"),
        ] {
            if !probe.is_supported(code) {
                return Err(format!("io_uring lacks IORING_OP_{name} on this kernel"));
            }
        }
        // A no-op must round-trip: some sandboxes allow the setup but not the submission.
        // SAFETY: a NOP references no memory.
        unsafe {
            ring.submission().push(&opcode::Nop::new().build().user_data(1)).map_err(|_| "io_uring queue full".to_string())?;
        }
        ring.submit_and_wait(1).map_err(|e| format!("io_uring_enter failed: {e}"))?;
        let nop = ring.completion().next().ok_or("io_uring returned no completion for a NOP")?;
        if nop.result() < 0 {
            return Err(format!("io_uring NOP failed: {}", os_error(-nop.result())));
        }
        // SAFETY: plain syscall.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(format!("eventfd failed: {}", std::io::Error::last_os_error()));
        }
        let shared = Arc::new(UringShared {
            queue: Mutex::new(VecDeque::new()),
            efd,
            shutdown: AtomicBool::new(false),
            table: OpTable { ops: Mutex::new(HashMap::new()), sink },
        });
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("horizon-uring".into())
            .spawn(move || ring_thread(ring, s, depth))
            .map_err(|e| format!("spawning the io_uring thread failed: {e}"))?;
        Ok(UringIo { shared, handle: Some(handle), chunk })
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: an 8-byte write to our eventfd.
        unsafe { libc::write(self.shared.efd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

fn ring_thread(mut ring: IoUring, s: Arc<UringShared>, depth: usize) {
    let mut slots: Vec<Option<Op>> = vec![None; depth];
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let mut inflight = 0usize;
    let mut armed = false;
    loop {
        {
            let mut sq = ring.submission();
            if !armed {
                let poll = opcode::PollAdd::new(types::Fd(s.efd), libc::POLLIN as u32).build().user_data(WAKE);
                // SAFETY: the eventfd outlives the ring (closed after this thread ends).
                if unsafe { sq.push(&poll) }.is_ok() {
                    armed = true;
                }
            }
            let mut q = lock(&s.queue);
            while let Some(&slot) = free.last() {
                let Some(op) = q.pop_front() else { break };
                // SAFETY: the op's buffer stays live and unshared until its completion is
                // reported (the submitter's contract); the entry is pushed once.
                if unsafe { sq.push(&entry_of(&op, slot as u64)) }.is_err() {
                    q.push_front(op);
                    break;
                }
                free.pop();
                slots[slot] = Some(op);
                inflight += 1;
            }
            if s.shutdown.load(Ordering::Acquire) && inflight == 0 && q.is_empty() {
                return;
            }
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => {
                // The ring itself failed: report every chunk in flight and everything queued,
                // and carry on with blocking calls so no operation is left hanging.
                let msg = format!("io_uring_enter failed: {e}");
                for slot in slots.iter_mut() {
                    if let Some(op) = slot.take() {
                        s.table.finish(op.token, Err(msg.clone()));
                    }
                }
                let rest: Vec<Op> = lock(&s.queue).drain(..).collect();
                for op in rest {
                    let r = run_blocking(&op);
                    s.table.finish(op.token, r);
                }
                free = (0..depth).rev().collect();
                inflight = 0;
                armed = false;
                continue;
            }
        }
        let done: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (ud, res) in done {
            if ud == WAKE {
                armed = false;
                let mut v: u64 = 0;
                // SAFETY: an 8-byte read from our non-blocking eventfd.
                unsafe { libc::read(s.efd, &mut v as *mut u64 as *mut libc::c_void, 8) };
                continue;
            }
            let slot = ud as usize;
            let Some(op) = slots.get_mut(slot).and_then(|x| x.take()) else { continue };
            free.push(slot);
            inflight -= 1;
            if res < 0 {
                let code = -res;
                if code == libc::EINTR || code == libc::EAGAIN {
                    lock(&s.queue).push_front(op);
                } else {
                    s.table.finish(op.token, Err(format!("{} failed: {}", what(&op), os_error(code))));
                }
                continue;
            }
            let n = res as usize;
            match op.kind {
                OpKind::Sync => s.table.finish(op.token, Ok(())),
                _ if n >= op.len => s.table.finish(op.token, Ok(())),
                _ if n == 0 => s.table.finish(op.token, Err(format!("{} failed: unexpected end of file", what(&op)))),
                _ => lock(&s.queue).push_front(Op { buf: op.buf + n, len: op.len - n, offset: op.offset + n as u64, ..op }),
            }
        }
    }
}

impl Backend for UringIo {
    fn submit(&self, ops: &[Op]) {
        let chunks = chunked(&self.shared.table, ops, self.chunk);
        if chunks.is_empty() {
            return;
        }
        lock(&self.shared.queue).extend(chunks);
        self.wake();
    }
    fn name(&self) -> &'static str {
        "io_uring"
    }
}

impl Drop for UringIo {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.wake();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        // SAFETY: the ring thread, the only other user, has ended.
        unsafe { libc::close(self.shared.efd) };
    }
}

// ---------------------------------------------------------------------------------- choice

/// Parameters of a back end.
#[derive(Clone, Copy, Debug)]
pub struct IoConfig {
    /// Bytes per request (a multiple of 4096).
    pub chunk_bytes: usize,
    /// Requests in flight (io_uring) or threads (pool).
    pub queue_depth: usize,
}

impl Default for IoConfig {
    fn default() -> Self {
        IoConfig { chunk_bytes: 1 << 20, queue_depth: 16 }
    }
}

/// The back end for `choice`, and a note saying what was chosen and why (empty when io_uring
/// was asked for or chosen without trouble). Err only when io_uring was demanded and refused.
pub fn open(choice: IoChoice, cfg: IoConfig, sink: Sink) -> Result<(Box<dyn Backend>, String), String> {
    let chunk = cfg.chunk_bytes.max(4096).next_multiple_of(4096);
    let threads = || Box::new(ThreadPoolIo::new(cfg.queue_depth.clamp(1, 64), chunk, sink.clone())) as Box<dyn Backend>;
    match choice {
        IoChoice::Threads => Ok((threads(), "pread/pwrite threads (asked for)".into())),
        IoChoice::Uring => UringIo::new(cfg.queue_depth, chunk, sink.clone()).map(|u| (Box::new(u) as Box<dyn Backend>, String::new())),
        IoChoice::Auto => match UringIo::new(cfg.queue_depth, chunk, sink.clone()) {
            Ok(u) => Ok((Box::new(u), String::new())),
            Err(why) => Ok((threads(), format!("io_uring unavailable ({why}): pread/pwrite threads"))),
        },
    }
}

/// Which back end `auto` would pick here, and why (for `horizon doctor`).
pub fn probe() -> (String, String) {
    let sink: Sink = Arc::new(|_, _| {});
    match UringIo::new(4, 4096, sink) {
        Ok(_) => ("io_uring".into(), String::new()),
        Err(why) => ("threads".into(), format!("io_uring unavailable ({why})")),
    }
}
