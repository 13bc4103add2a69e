//! The tier's directory on disk. `TierFiles::create` takes an exclusive lock on the directory,
//! clears what a dead run left there, creates one preallocated file per layer (`fallocate`, so
//! the blocks exist before the first step and fresh parts read as zeros) and a manifest; every
//! failure removes whatever it had created. Dropping `TierFiles` removes the files, the
//! manifest and the lock: the state files are the working copy of a run, its checkpoints are
//! written elsewhere.
//!
//! Layout under DIR:
//!
//! ```text
//! DIR/horizon-offload.lock        flock'ed while a run uses DIR
//! DIR/horizon-offload/tier.json   what the files hold (layer sizes, parts, direct I/O)
//! DIR/horizon-offload/layer-00000.state ...
//! ```

use super::layout::{LayerLayout, ALIGN};
use std::ffi::CString;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub const SUBDIR: &str = "horizon-offload";
pub const LOCK: &str = "horizon-offload.lock";
pub const MANIFEST: &str = "tier.json";
pub const TMPFS_MAGIC: i64 = 0x0102_1994;

fn cstr(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("path {} contains a NUL byte", p.display()))
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// What the file system under a directory offers: free bytes for an unprivileged user, its
/// type, and whether it lives in memory.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FsInfo {
    pub available_bytes: u64,
    pub total_bytes: u64,
    pub fs_type: String,
    pub in_memory: bool,
}

fn fs_type_name(magic: i64) -> String {
    match magic {
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0x6573_5546 => "fuse".into(),
        0x6969 => "nfs".into(),
        0xF2F5_2010 => "f2fs".into(),
        m => format!("0x{m:x}"),
    }
}

// The statvfs / statfs field types differ across targets: the casts are not no-ops everywhere.
#[allow(clippy::unnecessary_cast)]
pub fn fs_info(dir: &Path) -> Result<FsInfo, String> {
    let c = cstr(dir)?;
    // SAFETY: plain data structs filled by the kernel.
    let (mut v, mut f): (libc::statvfs, libc::statfs) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    if unsafe { libc::statvfs(c.as_ptr(), &mut v) } != 0 || unsafe { libc::statfs(c.as_ptr(), &mut f) } != 0 {
        return Err(format!("{}: {}", dir.display(), errno()));
    }
    let magic = f.f_type as i64;
    Ok(FsInfo {
        available_bytes: v.f_bavail as u64 * v.f_frsize as u64,
        total_bytes: v.f_blocks as u64 * v.f_frsize as u64,
        fs_type: fs_type_name(magic),
        in_memory: magic == TMPFS_MAGIC || magic == 0x8584_58f6, /* ramfs */
    })
}

/// A page-aligned scratch buffer (direct I/O wants aligned memory).
pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    pub(crate) fn zeroed(len: usize) -> AlignedBuf {
        let len = len.max(ALIGN).next_multiple_of(ALIGN);
        let layout = std::alloc::Layout::from_size_align(len, ALIGN).expect("aligned layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory allocating {len} bytes");
        AlignedBuf { ptr, len }
    }
    pub(crate) fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr
    }
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, std::alloc::Layout::from_size_align(self.len, ALIGN).unwrap()) };
    }
}

/// Whether files under `dir` accept direct I/O: Ok(()), or Err(the reason). Creates, writes,
/// reads back and removes one small file.
pub fn probe_direct(dir: &Path) -> Result<(), String> {
    let path = dir.join(format!(".horizon-direct-probe-{}", std::process::id()));
    let c = cstr(&path)?;
    // SAFETY: a plain open of a path we own.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC | libc::O_DIRECT, 0o600) };
    if fd < 0 {
        let e = errno();
        // O_DIRECT refused at open (EINVAL): retry without it only to clean up.
        let _ = std::fs::remove_file(&path);
        return Err(format!("open with O_DIRECT failed: {e}"));
    }
    let buf = AlignedBuf::zeroed(ALIGN);
    // SAFETY: buf is ALIGN bytes, aligned; fd is ours.
    let r = unsafe {
        std::ptr::write_bytes(buf.as_mut_ptr(), 0x5a, ALIGN);
        let w = libc::pwrite(fd, buf.as_mut_ptr() as *const libc::c_void, ALIGN, 0);
        if w != ALIGN as isize {
            Err(format!("an aligned O_DIRECT write failed: {}", if w < 0 { errno().to_string() } else { format!("wrote {w} bytes") }))
        } else {
            std::ptr::write_bytes(buf.as_mut_ptr(), 0, ALIGN);
            let r = libc::pread(fd, buf.as_mut_ptr() as *mut libc::c_void, ALIGN, 0);
            if r != ALIGN as isize || *buf.as_mut_ptr() != 0x5a {
                Err(format!("an aligned O_DIRECT read failed: {}", if r < 0 { errno().to_string() } else { format!("read {r} bytes") }))
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: closing our own descriptor.
    unsafe { libc::close(fd) };
    let _ = std::fs::remove_file(&path);
    r
}

/// The open files of one tier.
pub struct TierFiles {
    dir: PathBuf,
    sub: PathBuf,
    lock_fd: RawFd,
    fds: Vec<RawFd>,
    layouts: Vec<LayerLayout>,
    direct: bool,
    /// Why the files are not preallocated (file systems without fallocate); empty when they are.
    pub prealloc_note: String,
}

impl TierFiles {
    /// Locks `dir`, removes a dead run's files, creates and preallocates one file per layer.
    /// `direct`: open with O_DIRECT (the caller probed it). On failure nothing is left behind.
    pub fn create(dir: &Path, layouts: &[LayerLayout], direct: bool) -> Result<TierFiles, String> {
        let meta = std::fs::metadata(dir).map_err(|e| format!("offload dir {}: {e}", dir.display()))?;
        if !meta.is_dir() {
            return Err(format!("offload dir {} is not a directory", dir.display()));
        }
        let lock_fd = lock_dir(dir)?;
        let mut files = TierFiles {
            dir: dir.to_path_buf(),
            sub: dir.join(SUBDIR),
            lock_fd,
            fds: Vec::new(),
            layouts: layouts.to_vec(),
            direct,
            prealloc_note: String::new(),
        };
        // On error, `files` drops here and removes what was made (the subdirectory, the lock).
        files.populate()?;
        Ok(files)
    }

    fn populate(&mut self) -> Result<(), String> {
        // A dead run's files (the lock was free, so nobody uses them): ours by name only.
        if self.sub.exists() {
            remove_tier_dir(&self.sub).map_err(|e| format!("cannot clear the old {}: {e}", self.sub.display()))?;
        }
        std::fs::create_dir(&self.sub).map_err(|e| format!("cannot create {}: {e}", self.sub.display()))?;
        for (i, l) in self.layouts.clone().iter().enumerate() {
            let path = self.layer_path(i);
            let c = cstr(&path)?;
            let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC | if self.direct { libc::O_DIRECT } else { 0 };
            // SAFETY: plain open of a new path.
            let fd = unsafe { libc::open(c.as_ptr(), flags, 0o600) };
            if fd < 0 {
                return Err(format!("cannot create {}: {}", path.display(), errno()));
            }
            self.fds.push(fd);
            let len = l.file_bytes() as libc::off_t;
            // SAFETY: our descriptor.
            let r = unsafe { libc::fallocate(fd, 0, 0, len) };
            if r != 0 {
                let e = errno();
                match e.raw_os_error() {
                    Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
                        return Err(format!(
                            "no space left in offload dir {}: the disk tier needs {} bytes",
                            self.dir.display(),
                            self.total_bytes()
                        ))
                    }
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                        self.prealloc_note = format!("fallocate unsupported ({e}): files sized with ftruncate");
                        if unsafe { libc::ftruncate(fd, len) } != 0 {
                            return Err(format!("cannot size {}: {}", path.display(), errno()));
                        }
                    }
                    _ => return Err(format!("cannot preallocate {}: {e}", path.display())),
                }
            }
        }
        let manifest = serde_json::json!({
            "format": 1,
            "what": "horizon disk tier: per layer fp32 master, exp_avg, exp_avg_sq (and the step's gradient with clipping), each part page-aligned",
            "align": ALIGN,
            "direct_io": self.direct,
            "layers": self.layouts.iter().map(|l| serde_json::json!({"numel": l.numel, "part_bytes": l.part_bytes, "with_grad": l.with_grad})).collect::<Vec<_>>(),
        });
        let mpath = self.sub.join(MANIFEST);
        std::fs::write(&mpath, serde_json::to_vec_pretty(&manifest).unwrap_or_default())
            .map_err(|e| format!("cannot write {}: {e}", mpath.display()))?;
        Ok(())
    }

    pub fn layer_path(&self, layer: usize) -> PathBuf {
        self.sub.join(format!("layer-{layer:05}.state"))
    }

    pub fn fd(&self, layer: usize) -> RawFd {
        self.fds[layer]
    }

    pub fn layouts(&self) -> &[LayerLayout] {
        &self.layouts
    }

    pub fn direct(&self) -> bool {
        self.direct
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of all layer files.
    pub fn total_bytes(&self) -> u64 {
        self.layouts.iter().map(|l| l.file_bytes() as u64).sum()
    }
}

/// An exclusive, non-blocking flock on DIR/horizon-offload.lock. A lock file unlinked by its
/// last holder between our open and our flock is retried, so two runs never both own DIR.
fn lock_dir(dir: &Path) -> Result<RawFd, String> {
    let lock_path = dir.join(LOCK);
    let lc = cstr(&lock_path)?;
    for _ in 0..8 {
        let created = !lock_path.exists();
        // SAFETY: plain open/flock/fstat/stat on a path we own; the structs are plain data.
        unsafe {
            let fd = libc::open(lc.as_ptr(), libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC, 0o600);
            if fd < 0 {
                return Err(format!("offload dir {} is not writable: {}", dir.display(), errno()));
            }
            if libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) != 0 {
                let e = errno();
                libc::close(fd);
                if created {
                    let _ = std::fs::remove_file(&lock_path);
                }
                return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    format!("offload dir {} is in use by another run (it holds {})", dir.display(), lock_path.display())
                } else {
                    format!("cannot lock offload dir {}: {e}", dir.display())
                });
            }
            let (mut a, mut b): (libc::stat, libc::stat) = (std::mem::zeroed(), std::mem::zeroed());
            if libc::fstat(fd, &mut a) == 0 && libc::stat(lc.as_ptr(), &mut b) == 0 && a.st_ino == b.st_ino && a.st_dev == b.st_dev {
                return Ok(fd);
            }
            libc::close(fd);
        }
    }
    Err(format!("cannot lock offload dir {}: its lock file keeps changing", dir.display()))
}

fn remove_tier_dir(sub: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(sub)? {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name == MANIFEST || (name.starts_with("layer-") && name.ends_with(".state")) {
            std::fs::remove_file(e.path())?;
        }
    }
    std::fs::remove_dir(sub)
}

impl Drop for TierFiles {
    fn drop(&mut self) {
        for &fd in &self.fds {
            // SAFETY: our descriptors, closed once.
            unsafe { libc::close(fd) };
        }
        self.fds.clear();
        let _ = remove_tier_dir(&self.sub);
        // Unlink before unlocking: a run that takes the lock next then creates a fresh file.
        let _ = std::fs::remove_file(self.dir.join(LOCK));
        // SAFETY: our descriptor; closing releases the flock.
        unsafe { libc::close(self.lock_fd) };
    }
}
