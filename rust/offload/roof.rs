//! The sequential bandwidth of a directory's disk with the tier's own I/O path (direct I/O,
//! the chosen back end, the same request size and depth): the roof the optimizer's disk pass
//! is measured against, and what `horizon plan` bounds a step with.

use super::files::AlignedBuf;
use super::io::{self, IoChoice, IoConfig, Op, OpKind};
use super::layout::ALIGN;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
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
    /// The first write into freshly preallocated blocks, fdatasync included.
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

/// Writes `bytes` (rounded to whole requests) to a scratch file under `dir` twice, reads them
/// once, reads half and overwrites half at once, and removes the file (also on failure).
pub fn measure(dir: &Path, bytes: usize, cfg: IoConfig, choice: IoChoice, direct: bool) -> Result<Roof, String> {
    let chunk = cfg.chunk_bytes.max(ALIGN).next_multiple_of(ALIGN);
    // Ops of 8 chunks each, so a pass has many operations in flight through the back end.
    let op_bytes = chunk * 8;
    let bytes = bytes.max(op_bytes).next_multiple_of(op_bytes);
    let path = dir.join(format!(".horizon-disk-roof-{}", std::process::id()));
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| "path contains a NUL byte".to_string())?;
    // SAFETY: plain open of a new scratch path.
    let fd = unsafe {
        libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 }, 0o600)
    };
    if fd < 0 {
        return Err(format!("cannot create {}: {}", path.display(), std::io::Error::last_os_error()));
    }
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
        let buf = AlignedBuf::zeroed(op_bytes);
        // A pattern, not zeros: no layer below may skip the work.
        // SAFETY: inside the buffer.
        unsafe {
            let s = std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u64, buf.len() / 8);
            for (i, x) in s.iter_mut().enumerate() {
                *x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            }
        }
        let (tx, rx) = channel::<Result<(), String>>();
        let tx = Mutex::new(tx);
        let sink: io::Sink = Arc::new(move |_, r| {
            let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send(r);
        });
        let (backend, note) = io::open(choice, IoConfig { chunk_bytes: chunk, queue_depth: cfg.queue_depth }, sink)?;
        // Reads land in a buffer of their own: the writes' pattern stays intact.
        let sink_buf = AlignedBuf::zeroed(op_bytes);
        // `mixed`: even requests read, odd ones write.
        let pass = |kind: OpKind, mixed: bool| -> Result<f64, String> {
            let n = bytes / op_bytes;
            let ops: Vec<Op> = (0..n)
                .map(|k| {
                    let kind = if mixed { [OpKind::Read, OpKind::Write][k % 2] } else { kind };
                    let b = if kind == OpKind::Read { sink_buf.as_mut_ptr() } else { buf.as_mut_ptr() };
                    Op { kind, fd, buf: b as usize, len: op_bytes, offset: (k * op_bytes) as u64, token: k as u64 }
                })
                .collect();
            let t = Instant::now();
            backend.submit(&ops);
            for _ in 0..n {
                rx.recv().map_err(|_| "the I/O back end stopped".to_string())??;
            }
            if kind == OpKind::Write || mixed {
                backend.submit(&[Op { kind: OpKind::Sync, fd, buf: 0, len: 0, offset: 0, token: u64::MAX }]);
                rx.recv().map_err(|_| "the I/O back end stopped".to_string())??;
            }
            Ok(bytes as f64 / t.elapsed().as_secs_f64() / 1e9)
        };
        let first_write_gbps = pass(OpKind::Write, false)?;
        let write_gbps = pass(OpKind::Write, false)?;
        let read_gbps = pass(OpKind::Read, false)?;
        let mixed_gbps = pass(OpKind::Read, true)?;
        Ok(Roof {
            bytes: bytes as u64,
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
    })();
    // SAFETY: our descriptor; the back end (and its threads) ended inside the closure.
    unsafe { libc::close(fd) };
    let _ = std::fs::remove_file(&path);
    result
}
