//! The sequential bandwidth of a disk with the tier's own I/O path (direct I/O, the chosen back
//! end, the same request size and depth): the roof the optimizer's disk pass is measured
//! against, and what `horizon plan` bounds a step with. `measure` uses a scratch file in a
//! directory; `measure_files` the files given (e.g. a tier's own layer files, so the roof and
//! the pass see the same blocks).

use super::files::AlignedBuf;
use super::io::{self, IoChoice, IoConfig, Op, OpKind};
use super::layout::ALIGN;
use std::ffi::CString;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Roof {
    pub bytes: u64,
    /// Sequential reads, GB/s (1e9 bytes).
    pub read_gbps: f64,
    /// Sequential overwrites of allocated blocks, fdatasync included (the tier's steady state).
    pub write_gbps: f64,
    /// The first write pass (into freshly preallocated blocks for `measure`), fdatasync included.
    pub first_write_gbps: f64,
    /// Half the requests reads, half overwrites, interleaved and in flight together (the
    /// optimizer's traffic: every layer read and written back), fdatasync included.
    pub mixed_gbps: f64,
    pub backend: String,
    pub backend_note: String,
    pub direct_io: bool,
    pub chunk_bytes: usize,
    pub queue_depth: usize,
}

fn open(path: &Path, flags: libc::c_int, direct: bool) -> Result<RawFd, String> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| "path contains a NUL byte".to_string())?;
    // SAFETY: a plain open.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 }, 0o600) };
    if fd < 0 {
        return Err(format!("cannot open {}: {}", path.display(), std::io::Error::last_os_error()));
    }
    Ok(fd)
}

/// Writes `bytes` (rounded to whole requests) to a scratch file under `dir` twice, reads them
/// once, reads half and overwrites half at once, and removes the file (also on failure).
pub fn measure(dir: &Path, bytes: usize, cfg: IoConfig, choice: IoChoice, direct: bool) -> Result<Roof, String> {
    let op_bytes = op_bytes(cfg);
    let bytes = bytes.max(op_bytes).next_multiple_of(op_bytes);
    let path = dir.join(format!(".horizon-disk-roof-{}", std::process::id()));
    let fd = open(&path, libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC, direct)?;
    let result = (|| {
        // SAFETY: our descriptor.
        if unsafe { libc::fallocate(fd, 0, 0, bytes as libc::off_t) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOSPC) {
                return Err(format!("no space left in {} for a {bytes}-byte measurement", dir.display()));
            }
            if unsafe { libc::ftruncate(fd, bytes as libc::off_t) } != 0 {
                return Err(format!("cannot size {}: {}", path.display(), std::io::Error::last_os_error()));
            }
        }
        passes(&[(fd, bytes)], cfg, choice, direct, true)
    })();
    // SAFETY: our descriptor; the back end (and its threads) ended inside `passes`.
    unsafe { libc::close(fd) };
    let _ = std::fs::remove_file(&path);
    result
}

/// The same passes over existing files (each read and overwritten whole, with a pattern: their
/// contents are lost). Their sizes must be multiples of 4096 for direct I/O.
pub fn measure_files(paths: &[PathBuf], cfg: IoConfig, choice: IoChoice, direct: bool) -> Result<Roof, String> {
    let mut fds: Vec<(RawFd, usize)> = Vec::new();
    let result = (|| {
        for p in paths {
            let len = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?.len() as usize;
            if direct && !len.is_multiple_of(ALIGN) {
                return Err(format!("{}: {len} bytes is not a multiple of {ALIGN}", p.display()));
            }
            fds.push((open(p, libc::O_RDWR, direct)?, len));
        }
        passes(&fds, cfg, choice, direct, false)
    })();
    for (fd, _) in fds {
        // SAFETY: our descriptors; the back end ended inside `passes`.
        unsafe { libc::close(fd) };
    }
    result
}

fn op_bytes(cfg: IoConfig) -> usize {
    // Operations of 8 requests each, so a pass has many in flight through the back end.
    cfg.chunk_bytes.max(ALIGN).next_multiple_of(ALIGN) * 8
}

/// Write, read and mixed passes over `targets` (fd, length). `fresh` (blocks never written):
/// write twice (the first into fresh blocks), then read, then mixed; else read first while the
/// disk is quiet (no write-back of ours pending), then mixed, then write twice.
fn passes(targets: &[(RawFd, usize)], cfg: IoConfig, choice: IoChoice, direct: bool, fresh: bool) -> Result<Roof, String> {
    let chunk = cfg.chunk_bytes.max(ALIGN).next_multiple_of(ALIGN);
    let op_len = op_bytes(cfg);
    let total: usize = targets.iter().map(|t| t.1).sum();
    if total == 0 {
        return Err("nothing to measure".into());
    }
    let buf = AlignedBuf::zeroed(op_len);
    // A pattern, not zeros: no layer below may skip the work.
    // SAFETY: inside the buffer.
    unsafe {
        let s = std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u64, buf.len() / 8);
        for (i, x) in s.iter_mut().enumerate() {
            *x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    // Reads land in a buffer of their own: the writes' pattern stays intact.
    let sink_buf = AlignedBuf::zeroed(op_len);
    let (tx, rx) = channel::<Result<(), String>>();
    let tx = Mutex::new(tx);
    let sink: io::Sink = Arc::new(move |_, r| {
        let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send(r);
    });
    let (backend, note) = io::open(choice, IoConfig { chunk_bytes: chunk, queue_depth: cfg.queue_depth }, sink)?;
    // `mixed`: every other operation reads, the others write.
    let pass = |kind: OpKind, mixed: bool| -> Result<f64, String> {
        let mut ops = Vec::new();
        for &(fd, len) in targets {
            let mut at = 0;
            while at < len {
                let k = ops.len();
                let kind = if mixed { [OpKind::Read, OpKind::Write][k % 2] } else { kind };
                let b = if kind == OpKind::Read { sink_buf.as_mut_ptr() } else { buf.as_mut_ptr() };
                let n = op_len.min(len - at);
                ops.push(Op { kind, fd, buf: b as usize, len: n, offset: at as u64, token: k as u64 });
                at += n;
            }
        }
        let t = Instant::now();
        backend.submit(&ops);
        for _ in 0..ops.len() {
            rx.recv().map_err(|_| "the I/O back end stopped".to_string())??;
        }
        if kind == OpKind::Write || mixed {
            let syncs: Vec<Op> =
                // Tokens name operations: one each (the back end reports per token).
                targets.iter().enumerate().map(|(i, &(fd, _))| Op { kind: OpKind::Sync, fd, buf: 0, len: 0, offset: 0, token: u64::MAX - i as u64 }).collect();
            backend.submit(&syncs);
            for _ in 0..syncs.len() {
                rx.recv().map_err(|_| "the I/O back end stopped".to_string())??;
            }
        }
        Ok(total as f64 / t.elapsed().as_secs_f64() / 1e9)
    };
    let (first_write_gbps, write_gbps, read_gbps, mixed_gbps) = if fresh {
        let w1 = pass(OpKind::Write, false)?;
        let w2 = pass(OpKind::Write, false)?;
        (w1, w2, pass(OpKind::Read, false)?, pass(OpKind::Read, true)?)
    } else {
        let r = pass(OpKind::Read, false)?;
        let m = pass(OpKind::Read, true)?;
        let w1 = pass(OpKind::Write, false)?;
        (w1, pass(OpKind::Write, false)?, r, m)
    };
    Ok(Roof {
        bytes: total as u64,
        read_gbps,
        write_gbps,
        first_write_gbps,
        mixed_gbps,
        backend: backend.name().to_string(),
        backend_note: note,
        direct_io: direct,
        chunk_bytes: chunk,
        queue_depth: cfg.queue_depth,
    })
}
