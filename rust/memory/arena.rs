//! The host arena: page-aligned anonymous mappings with transparent huge pages requested, bound
//! to one NUMA node, pre-faulted by pinned threads, and page-locked (`cuMemHostRegister`) on
//! request, each requested range as one registration (all of it pinned, or none of it). A `HostRegion` owns one mapping; it is shared through `Arc` by everything
//! that views it (layer slabs, tensors exported to Python), and unmapped with the last holder.

use crate::cpu::topology;
use serde::Serialize;
use std::sync::Mutex;

/// Huge-page size on x86-64 and arm64 (4 KiB base pages); regions at least this large start on
/// a multiple of it so the kernel can back them with huge pages from the first byte.
pub const HUGE_PAGE: usize = 2 << 20;

const MPOL_BIND: libc::c_int = 2;

#[derive(Debug, Clone)]
pub struct MemoryError(pub String);

impl std::fmt::Display for MemoryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for MemoryError {}

#[derive(Debug, Clone)]
pub struct RegionOptions {
    /// The node to bind to; None leaves placement to first touch (the pre-fault threads run on
    /// every allowed CPU then).
    pub numa_node: Option<u32>,
    pub huge_pages: bool,
    /// Touch every page now, from threads pinned to the node's CPUs.
    pub prefault: bool,
}

impl Default for RegionOptions {
    fn default() -> Self {
        RegionOptions { numa_node: None, huge_pages: true, prefault: true }
    }
}

/// Where a region's pages went and why: reported by `horizon doctor` and the Python store.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Placement {
    pub numa_node: Option<u32>,
    /// True when `mbind` succeeded.
    pub bound: bool,
    /// Why the region is not bound (empty when bound).
    pub bind_note: String,
    pub huge_pages_requested: bool,
    /// Why `madvise(MADV_HUGEPAGE)` did not apply (empty when it did or was not asked for).
    pub huge_pages_note: String,
    pub prefault_threads: usize,
    pub pinned_bytes: usize,
    /// Page-locked ranges (each one `cuMemHostRegister` call: a copy within a range is one
    /// DMA-able piece).
    pub pinned_ranges: usize,
    /// "not requested", "pinned", or "failed" (then `pin_note` says why: the range stays
    /// pageable as a whole, never partly pinned).
    pub pin_state: String,
    /// Why a requested pin did not happen (empty when all requested ranges are pinned).
    pub pin_note: String,
}

pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

fn errno_text() -> (i32, String) {
    let e = std::io::Error::last_os_error();
    (e.raw_os_error().unwrap_or(0), e.to_string())
}

/// mbind's node mask with only `node` set (64-bit words), and its `maxnode` argument: the
/// kernel reads maxnode-1 bits, so every bit of the words.
fn node_mask(node: u32) -> (Vec<libc::c_ulong>, libc::c_ulong) {
    let words = node as usize / 64 + 1;
    let mut mask = vec![0 as libc::c_ulong; words];
    mask[node as usize / 64] |= 1 << (node % 64);
    (mask, (words * 64 + 1) as libc::c_ulong)
}

/// Binds `[ptr, ptr+len)` to `node`. Err carries the reason it did not happen; the callers
/// treat it as a no-op, since single-node machines and sandboxes refuse it routinely.
fn bind_to_node(ptr: *mut u8, len: usize, node: u32) -> Result<(), String> {
    let nodes = topology::numa_nodes();
    if nodes.len() <= 1 {
        return Err("single NUMA node: binding not needed".into());
    }
    let (mask, maxnode) = node_mask(node);
    // SAFETY: the range is a mapping we own; the mask outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_mbind, ptr, len, MPOL_BIND, mask.as_ptr(), maxnode, 0 as libc::c_uint) };
    if r == 0 {
        return Ok(());
    }
    let (code, text) = errno_text();
    Err(match code {
        libc::ENOSYS => format!("mbind unavailable (ENOSYS: {text})"),
        libc::EPERM => format!("mbind refused (EPERM: {text})"),
        libc::EINVAL => format!("mbind rejected the request (EINVAL: {text})"),
        _ => format!("mbind failed: {text}"),
    })
}

fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        // Failure only loses locality; the touch still happens.
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Touches every page of the range so the kernel allocates it now (under the node policy),
/// splitting the work over threads pinned to `cpus`. Returns the thread count used.
fn prefault(ptr: *mut u8, len: usize, cpus: &[usize]) -> usize {
    const PER_THREAD_MIN: usize = 64 << 20;
    let page = page_size();
    let threads = cpus.len().max(1).min(len.div_ceil(PER_THREAD_MIN)).max(1);
    let base = ptr as usize;
    let touch = move |start: usize, end: usize| {
        let mut off = start;
        while off < end {
            // SAFETY: off < len inside our mapping; a volatile write forces the fault.
            unsafe { std::ptr::write_volatile((base + off) as *mut u8, 0u8) };
            off += page;
        }
    };
    if threads == 1 {
        touch(0, len);
        return 1;
    }
    // Shards are whole huge pages so no huge page is split between two threads' faults.
    let shard = len.div_ceil(threads).div_ceil(HUGE_PAGE) * HUGE_PAGE;
    std::thread::scope(|s| {
        for t in 0..threads {
            let (start, end) = ((t * shard).min(len), ((t + 1) * shard).min(len));
            let cpu = cpus.get(t % cpus.len().max(1)).copied();
            s.spawn(move || {
                if let Some(c) = cpu {
                    pin_current_thread(c);
                }
                touch(start, end);
            });
        }
    });
    threads
}

/// One anonymous mapping owned by Rust.
pub struct HostRegion {
    ptr: *mut u8,
    len: usize,
    placement: Mutex<Placement>,
    /// Start and length of each registered chunk, unregistered on drop.
    pinned: Mutex<Vec<(usize, usize)>>,
}

// SAFETY: the region is plain memory; concurrent access to its bytes is the users' contract
// (as with any tensor storage); the bookkeeping is behind mutexes.
unsafe impl Send for HostRegion {}
unsafe impl Sync for HostRegion {}

impl HostRegion {
    /// Maps at least `bytes` bytes (rounded up to whole pages; one page for 0), zero-filled.
    pub fn map(bytes: usize, opts: &RegionOptions) -> Result<HostRegion, MemoryError> {
        let page = page_size();
        let nodes = topology::numa_nodes();
        if let Some(n) = opts.numa_node {
            if !nodes.iter().any(|x| x.id == n) {
                let ids: Vec<u32> = nodes.iter().map(|x| x.id).collect();
                return Err(MemoryError(format!("numa_node {n} does not exist (this machine's nodes: {ids:?})")));
            }
        }
        let len = bytes.max(1).div_ceil(page) * page;
        let align = if opts.huge_pages && len >= HUGE_PAGE { HUGE_PAGE } else { page };
        let map_len = len + (align - page);
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            let (_, text) = errno_text();
            return Err(MemoryError(format!("mmap of {len} bytes failed: {text}")));
        }
        // Trim the over-allocation so the region starts on an `align` boundary.
        let start = (raw as usize).next_multiple_of(align);
        let head = start - raw as usize;
        let tail = map_len - head - len;
        // SAFETY: both trimmed pieces lie inside the mapping just made and are not used.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
        }
        let ptr = start as *mut u8;
        let mut placement = Placement {
            numa_node: opts.numa_node,
            huge_pages_requested: opts.huge_pages,
            pin_state: "not requested".into(),
            ..Default::default()
        };
        if opts.huge_pages {
            // SAFETY: advice on our own mapping.
            if unsafe { libc::madvise(ptr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) } != 0 {
                placement.huge_pages_note = format!("madvise(MADV_HUGEPAGE) failed: {}", errno_text().1);
            } else if std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
                .map(|s| s.contains("[never]"))
                .unwrap_or(false)
            {
                placement.huge_pages_note = "transparent huge pages are disabled on this machine".into();
            }
        }
        match opts.numa_node {
            Some(n) => match bind_to_node(ptr, len, n) {
                Ok(()) => placement.bound = true,
                Err(reason) => placement.bind_note = reason,
            },
            None => placement.bind_note = "no node requested: pages follow first touch".into(),
        }
        if opts.prefault {
            let cpus: Vec<usize> = match opts.numa_node {
                Some(n) => nodes.iter().find(|x| x.id == n).map(|x| x.cpus.clone()).unwrap_or_default(),
                None => topology::allowed_cpus(),
            };
            let cpus = if cpus.is_empty() { topology::allowed_cpus() } else { cpus };
            placement.prefault_threads = prefault(ptr, len, &cpus);
        }
        Ok(HostRegion { ptr, len, placement: Mutex::new(placement), pinned: Mutex::new(Vec::new()) })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The mapped length in bytes (whole pages).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn placement(&self) -> Placement {
        self.placement.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Page-locks `[offset, offset+len)` (rounded out to whole pages) with one
    /// `cuMemHostRegister` call, never write-combined, so a copy anywhere in it is a copy
    /// from page-locked memory: a range pinned in pieces could fail (or silently stage) a copy
    /// that crosses from one piece into memory a later piece failed to register. Err (and the
    /// region's pin note and state) says why not, e.g. no driver; nothing of the range is
    /// registered then, and the memory stays usable, pageable. A range inside an earlier
    /// registration is already pinned; one that overlaps a registration partly is refused.
    pub fn pin(&self, offset: usize, len: usize) -> Result<(), MemoryError> {
        if !crate::cuda::driver_available() {
            self.check_pin_range(offset, len)?;
            if len == 0 {
                return Ok(());
            }
            return Err(self.pin_failed("no CUDA driver: host memory stays pageable".into()));
        }
        self.pin_with(offset, len, &|ptr, n| crate::cuda::host_register(ptr, n).map_err(|e| e.to_string()))
    }

    fn check_pin_range(&self, offset: usize, len: usize) -> Result<(), MemoryError> {
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(MemoryError(format!("pin range {offset}+{len} outside the region of {} bytes", self.len)));
        }
        Ok(())
    }

    fn pin_failed(&self, msg: String) -> MemoryError {
        let mut p = self.placement.lock().unwrap_or_else(|p| p.into_inner());
        p.pin_note = msg.clone();
        p.pin_state = "failed".into();
        MemoryError(msg)
    }

    /// `pin` with the registration call given (the tests stand in for the driver).
    pub(crate) fn pin_with(
        &self,
        offset: usize,
        len: usize,
        register: &dyn Fn(*mut u8, usize) -> Result<(), String>,
    ) -> Result<(), MemoryError> {
        self.check_pin_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let page = page_size();
        let start = offset / page * page;
        let end = (offset + len).div_ceil(page) * page;
        let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        if pinned.iter().any(|&(s, l)| start >= s && end <= s + l) {
            return Ok(()); // inside one earlier registration
        }
        if let Some(&(s, l)) = pinned.iter().find(|&&(s, l)| start < s + l && s < end) {
            drop(pinned);
            return Err(self.pin_failed(format!(
                "pin range [{start}, {end}) overlaps the registration [{s}, {}) partly: registrations cannot \
                 overlap, and a range is pinned as one piece",
                s + l
            )));
        }
        // SAFETY: the range lies in our mapping, which outlives the registration (drop
        // unregisters before unmapping).
        if let Err(e) = register(unsafe { self.ptr.add(start) }, end - start) {
            drop(pinned);
            return Err(self.pin_failed(format!(
                "cuMemHostRegister of {} bytes at offset {start} failed ({e}): that range stays pageable",
                end - start
            )));
        }
        pinned.push((start, end - start));
        let (total, ranges) = (pinned.iter().map(|&(_, l)| l).sum(), pinned.len());
        drop(pinned);
        let mut p = self.placement.lock().unwrap_or_else(|p| p.into_inner());
        p.pinned_bytes = total;
        p.pinned_ranges = ranges;
        if p.pin_state != "failed" {
            p.pin_state = "pinned".into();
        }
        Ok(())
    }

    pub fn pinned_bytes(&self) -> usize {
        self.pinned.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|&(_, l)| l).sum()
    }
}

/// Runs `f` with some CUDA context current: the last view of a region may be dropped on any
/// thread (torch frees tensors wherever their last reference goes), and cuMemHostUnregister
/// needs a context. A portable registration can be undone from any context, so device 0's
/// primary context serves when the thread has none; the thread is left as it was found.
fn with_any_context(f: impl FnOnce()) {
    use cudarc::driver::sys;
    let mut ctx: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: plain driver queries on handles the driver hands out; the driver is loaded (a
    // region only has registrations when it was).
    unsafe {
        if sys::cuCtxGetCurrent(&mut ctx).result().is_err() || !ctx.is_null() {
            return f();
        }
        let mut dev: sys::CUdevice = 0;
        let mut primary: sys::CUcontext = std::ptr::null_mut();
        let ok = sys::cuDeviceGet(&mut dev, 0).result().is_ok()
            && sys::cuDevicePrimaryCtxRetain(&mut primary, dev).result().is_ok()
            && sys::cuCtxSetCurrent(primary).result().is_ok();
        f();
        if ok {
            let _ = sys::cuCtxSetCurrent(std::ptr::null_mut()).result();
        }
    }
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        let pinned = std::mem::take(&mut *self.pinned.lock().unwrap_or_else(|p| p.into_inner()));
        // Without a driver nothing was registered (only the tests' stand-in registrar records).
        if !pinned.is_empty() && crate::cuda::driver_available() {
            with_any_context(|| {
                for (s, _) in pinned {
                    // SAFETY: registered by pin(). A failure (the driver torn down at exit)
                    // leaves nothing to undo.
                    let _ = crate::cuda::host_unregister(unsafe { self.ptr.add(s) });
                }
            });
        }
        // SAFETY: the mapping is ours and nothing views it any more (all holders are gone).
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// Per-node page counts of the mapping that contains `addr`, from `/proc/self/numa_maps`
/// (node id -> pages, and the kernel page size in KiB of that line). None when the file or
/// the line is missing (kernels without NUMA support).
pub fn numa_pages(addr: usize) -> Option<(Vec<(u32, u64)>, u64)> {
    let text = std::fs::read_to_string("/proc/self/numa_maps").ok()?;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    // numa_maps lines start at the vma start: find the vma of addr in /proc/self/maps.
    let vma_start = maps.lines().find_map(|l| {
        let range = l.split_whitespace().next()?;
        let (a, b) = range.split_once('-')?;
        let (a, b) = (usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?);
        (addr >= a && addr < b).then_some(a)
    })?;
    let line = text.lines().find(|l| {
        l.split_whitespace().next().and_then(|a| usize::from_str_radix(a, 16).ok()) == Some(vma_start)
    })?;
    let mut nodes = Vec::new();
    let mut kib = 4;
    for tok in line.split_whitespace() {
        if let Some(rest) = tok.strip_prefix('N') {
            if let Some((n, c)) = rest.split_once('=') {
                if let (Ok(n), Ok(c)) = (n.parse(), c.parse()) {
                    nodes.push((n, c));
                }
            }
        } else if let Some(k) = tok.strip_prefix("kernelpagesize_kB=") {
            kib = k.parse().unwrap_or(4);
        }
    }
    Some((nodes, kib))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefault_on_several_threads_makes_every_page_resident() {
        // Three threads (three 64 MiB shares) and a tail of three pages; mincore, the kernel's
        // own account, says which pages are resident.
        let page = page_size();
        let len = (192 << 20) + 3 * page;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let cpus = topology::allowed_cpus();
        let threads = prefault(ptr as *mut u8, len, &[cpus[0], cpus[0], cpus[0]]);
        assert_eq!(threads, 3);
        let mut resident = vec![0u8; len / page];
        // SAFETY: the vector holds one byte per page of the mapping.
        assert_eq!(unsafe { libc::mincore(ptr, len, resident.as_mut_ptr()) }, 0);
        let missing = resident.iter().filter(|&&r| r & 1 == 0).count();
        // SAFETY: our mapping.
        unsafe { libc::munmap(ptr, len) };
        assert_eq!(missing, 0, "{missing} of {} pages not faulted in", len / page);
    }

    #[test]
    fn the_node_mask_has_exactly_the_node_bit() {
        for node in [0u32, 1, 5, 63, 64, 65, 130] {
            let (mask, maxnode) = node_mask(node);
            assert_eq!(mask.len(), node as usize / 64 + 1, "node {node}");
            assert_eq!(maxnode as usize, mask.len() * 64 + 1, "node {node}");
            for bit in 0..mask.len() * 64 {
                let set = mask[bit / 64] >> (bit % 64) & 1 == 1;
                assert_eq!(set, bit == node as usize, "node {node} bit {bit}");
            }
        }
    }

    #[test]
    fn region_is_aligned_zeroed_and_writable() {
        let r = HostRegion::map(3 * HUGE_PAGE + 5, &RegionOptions::default()).unwrap();
        assert_eq!(r.as_ptr() as usize % HUGE_PAGE, 0);
        assert!(r.len() >= 3 * HUGE_PAGE + 5 && r.len().is_multiple_of(page_size()));
        // SAFETY: inside the region.
        let s = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), r.len()) };
        assert!(s.iter().all(|&b| b == 0));
        s[r.len() - 1] = 7;
        assert_eq!(s[r.len() - 1], 7);
        let small = HostRegion::map(0, &RegionOptions::default()).unwrap();
        assert_eq!(small.len(), page_size());
        assert_eq!(small.as_ptr() as usize % page_size(), 0);
    }

    #[test]
    fn numa_maps_shows_pages_on_the_requested_node() {
        let node = topology::numa_nodes()[0].id;
        let bytes = 8 * HUGE_PAGE;
        let opts = RegionOptions { numa_node: Some(node), huge_pages: true, prefault: true };
        let r = HostRegion::map(bytes, &opts).unwrap();
        let p = r.placement();
        assert!(p.bound || !p.bind_note.is_empty(), "an unbound region must say why");
        let Some((nodes, kib)) = numa_pages(r.as_ptr() as usize) else {
            eprintln!("no /proc/self/numa_maps on this kernel: placement not observable");
            return;
        };
        let total_kib: u64 = nodes.iter().map(|&(_, c)| c * kib).sum();
        // The vma may be merged with a neighbour, so at least the whole region is resident.
        assert!(total_kib * 1024 >= bytes as u64, "pre-faulted pages {total_kib} KiB < {bytes} bytes: {nodes:?}");
        if topology::numa_nodes().len() == 1 || p.bound {
            assert!(nodes.iter().all(|&(n, _)| n == node), "pages off node {node}: {nodes:?}");
        }
    }

    #[test]
    fn bad_node_is_an_error_naming_it() {
        let e = HostRegion::map(4096, &RegionOptions { numa_node: Some(999), ..Default::default() }).err().unwrap();
        assert!(e.0.contains("999"), "{}", e.0);
    }

    #[test]
    fn pin_without_driver_says_why_and_out_of_range_is_refused() {
        let r = HostRegion::map(1 << 20, &RegionOptions::default()).unwrap();
        assert!(r.pin(r.len(), 1).is_err());
        assert_eq!(r.placement().pin_state, "not requested");
        if !crate::cuda::driver_available() {
            let e = r.pin(0, 4096).err().unwrap();
            assert!(e.0.contains("driver"));
            let p = r.placement();
            assert!(p.pin_note.contains("driver") && p.pin_state == "failed");
            assert_eq!(r.pinned_bytes(), 0);
        } else {
            r.pin(0, r.len()).unwrap();
            assert_eq!(r.pinned_bytes(), r.len());
            r.pin(0, 4096).unwrap(); // already pinned: no double registration
            assert_eq!((r.placement().pinned_ranges, r.placement().pin_state.as_str()), (1, "pinned"));
        }
    }

    /// A stand-in for cuMemHostRegister: records each call, fails the calls it is told to.
    struct Registrar {
        calls: Mutex<Vec<(usize, usize)>>,
        fail_over: usize,
    }

    impl Registrar {
        fn new(fail_over: usize) -> Self {
            Registrar { calls: Mutex::new(Vec::new()), fail_over }
        }
        fn register(&self, p: *mut u8, n: usize) -> Result<(), String> {
            self.calls.lock().unwrap().push((p as usize, n));
            if n > self.fail_over {
                Err("CUDA_ERROR_OUT_OF_MEMORY".into())
            } else {
                Ok(())
            }
        }
        fn calls(&self) -> Vec<(usize, usize)> {
            self.calls.lock().unwrap().clone()
        }
    }

    #[test]
    fn a_range_is_registered_as_one_piece_whatever_its_size() {
        // 600 MiB of address space (not touched): more than the old 256 MiB pieces.
        let opts = RegionOptions { numa_node: None, huge_pages: false, prefault: false };
        let r = HostRegion::map(600 << 20, &opts).unwrap();
        let reg = Registrar::new(usize::MAX);
        let base = r.as_ptr() as usize;
        r.pin_with(100, r.len() - 200, &|p, n| reg.register(p, n)).unwrap();
        assert_eq!(reg.calls(), vec![(base, r.len())]); // rounded out to whole pages, one call
        let p = r.placement();
        assert_eq!((p.pinned_bytes, p.pinned_ranges, p.pin_state.as_str()), (r.len(), 1, "pinned"));
        r.pin_with(4096, 8192, &|p, n| reg.register(p, n)).unwrap(); // inside: nothing to do
        assert_eq!(reg.calls().len(), 1);
    }

    #[test]
    fn a_failed_registration_leaves_nothing_pinned_and_says_why() {
        let opts = RegionOptions { numa_node: None, huge_pages: false, prefault: false };
        let r = HostRegion::map(8 << 20, &opts).unwrap();
        let reg = Registrar::new(4 << 20); // refuses anything over 4 MiB
        let e = r.pin_with(0, r.len(), &|p, n| reg.register(p, n)).unwrap_err();
        assert!(e.0.contains("OUT_OF_MEMORY") && e.0.contains("pageable"), "{}", e.0);
        assert_eq!(reg.calls().len(), 1); // one attempt for the whole range, no pieces left behind
        let p = r.placement();
        assert_eq!((r.pinned_bytes(), p.pinned_bytes, p.pinned_ranges), (0, 0, 0));
        assert_eq!(p.pin_state, "failed");
        assert!(p.pin_note.contains("OUT_OF_MEMORY"));
        // A smaller range still pins; one that overlaps it partly is refused without a call.
        r.pin_with(0, 2 << 20, &|p, n| reg.register(p, n)).unwrap();
        assert_eq!(r.pinned_bytes(), 2 << 20);
        let e = r.pin_with(1 << 20, 2 << 20, &|p, n| reg.register(p, n)).unwrap_err();
        assert!(e.0.contains("overlaps"), "{}", e.0);
        assert_eq!(reg.calls().len(), 2);
    }
}
