//! The CUDA driver wrapper: finds the driver by dynamic load (never a crash when absent),
//! describes the GPUs, loads the embedded fatbin once per context and launches its kernels on
//! a raw stream handed in by the caller (torch's current stream), cooperatively for the
//! persistent kernels. Also host-memory
//! registration (`cuMemHostRegister`) for the arena.

pub mod kernels;

use cudarc::driver::result as cu;
use cudarc::driver::sys;
use serde::Serialize;
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Mutex, OnceLock};

pub use kernels::{embedded_kernels, fatbin, kernel_build_status, ptxas_report, KernelInfo};

#[derive(Debug)]
pub struct CudaError(pub String);

impl std::fmt::Display for CudaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for CudaError {}

pub type Result<T> = std::result::Result<T, CudaError>;

fn check(r: std::result::Result<(), cu::DriverError>, what: &str) -> Result<()> {
    r.map_err(|e| CudaError(format!("{what}: {e:?}")))
}

/// Whether libcuda can be loaded, and cuInit succeeds. Cached: the answer cannot change.
pub fn driver_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { sys::is_culib_present() } {
            return false;
        }
        std::panic::catch_unwind(|| cu::init().is_ok()).unwrap_or(false)
    })
}

fn require_driver() -> Result<()> {
    if driver_available() {
        Ok(())
    } else {
        Err(CudaError("no CUDA driver (libcuda could not be loaded or cuInit failed)".into()))
    }
}

pub fn driver_version() -> Option<i32> {
    if !driver_available() {
        return None;
    }
    let mut v = 0i32;
    // SAFETY: writes one int.
    unsafe { sys::cuDriverGetVersion(&mut v).result().ok()? };
    Some(v)
}

#[derive(Debug, Clone, Serialize)]
pub struct GpuInfo {
    pub ordinal: i32,
    pub name: String,
    pub total_memory_bytes: u64,
    pub compute_capability: (i32, i32),
    pub multiprocessors: i32,
    pub pci_bus_id: String,
    /// NUMA node of the GPU's PCI device, from sysfs; None where the kernel does not say.
    pub numa_node: Option<i32>,
}

pub fn gpus() -> Result<Vec<GpuInfo>> {
    require_driver()?;
    let n = cu::device::get_count().map_err(|e| CudaError(format!("cuDeviceGetCount: {e:?}")))?;
    let mut v = Vec::new();
    for i in 0..n {
        let dev = cu::device::get(i).map_err(|e| CudaError(format!("cuDeviceGet: {e:?}")))?;
        let attr = |a| unsafe { cu::device::get_attribute(dev, a) }.unwrap_or(-1);
        use sys::CUdevice_attribute as A;
        let (dom, bus, devid) = (
            attr(A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID),
            attr(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID),
            attr(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID),
        );
        let bdf = format!("{dom:04x}:{bus:02x}:{devid:02x}.0");
        let numa = std::fs::read_to_string(format!("/sys/bus/pci/devices/{bdf}/numa_node"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|n| *n >= 0);
        v.push(GpuInfo {
            ordinal: i,
            name: cu::device::get_name(dev).unwrap_or_default(),
            total_memory_bytes: unsafe { cu::device::total_mem(dev) }.unwrap_or(0) as u64,
            compute_capability: (
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
            ),
            multiprocessors: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
            pci_bus_id: bdf,
            numa_node: numa,
        });
    }
    Ok(v)
}

/// Makes sure a context is current on this thread: torch's (the device's primary context)
/// when torch has set one, else the primary context of `device`.
fn ensure_context(device: i32) -> Result<sys::CUcontext> {
    require_driver()?;
    let mut ctx: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: writes one handle.
    check(unsafe { sys::cuCtxGetCurrent(&mut ctx).result() }, "cuCtxGetCurrent")?;
    if !ctx.is_null() {
        return Ok(ctx);
    }
    let dev = cu::device::get(device).map_err(|e| CudaError(format!("cuDeviceGet({device}): {e:?}")))?;
    // SAFETY: the primary context is retained for the life of the process (as torch does).
    let ctx = unsafe { cu::primary_ctx::retain(dev) }
        .map_err(|e| CudaError(format!("cuDevicePrimaryCtxRetain: {e:?}")))?;
    check(unsafe { cu::ctx::set_current(ctx) }, "cuCtxSetCurrent")?;
    Ok(ctx)
}

struct Loaded {
    module: sys::CUmodule,
    functions: HashMap<String, usize>,
}
// SAFETY: module and function handles are plain driver handles, valid from any thread.
unsafe impl Send for Loaded {}

fn modules() -> &'static Mutex<HashMap<usize, Loaded>> {
    static M: OnceLock<Mutex<HashMap<usize, Loaded>>> = OnceLock::new();
    M.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The function `name` of the embedded fatbin in the current context (loaded once).
pub fn function(name: &str, device: i32) -> Result<sys::CUfunction> {
    if fatbin().is_empty() {
        return Err(CudaError(format!(
            "this build has no kernels ({}); rebuild with nvcc available",
            kernel_build_status()
        )));
    }
    let ctx = ensure_context(device)?;
    let mut map = modules().lock().unwrap_or_else(|p| p.into_inner());
    let entry = match map.entry(ctx as usize) {
        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => {
            // The driver may read the image as it likes: hand it an aligned, owned copy.
            let image: &'static [u64] = {
                let bytes = fatbin();
                let mut words = vec![0u64; bytes.len().div_ceil(8)];
                // SAFETY: words holds at least bytes.len() bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), words.as_mut_ptr() as *mut u8, bytes.len())
                };
                Box::leak(words.into_boxed_slice())
            };
            // SAFETY: a well-formed fatbin produced by nvcc at build time.
            let module = unsafe { cu::module::load_data(image.as_ptr() as *const c_void) }
                .map_err(|e| CudaError(format!("cuModuleLoadData (embedded fatbin): {e:?}")))?;
            v.insert(Loaded { module, functions: HashMap::new() })
        }
    };
    if let Some(f) = entry.functions.get(name) {
        return Ok(*f as sys::CUfunction);
    }
    let cname = CString::new(name).map_err(|_| CudaError(format!("bad kernel name {name:?}")))?;
    // SAFETY: module is loaded and never unloaded.
    let f = unsafe { cu::module::get_function(entry.module, cname) }
        .map_err(|e| CudaError(format!("kernel {name:?} not in the fatbin: {e:?}")))?;
    entry.functions.insert(name.to_string(), f as usize);
    Ok(f)
}

/// One kernel argument, passed by value as the kernel's parameter list expects.
#[derive(Debug, Clone, Copy)]
pub enum KernelArg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    U32(u32),
    F32(f32),
}

/// Launches the driver accepted, per kernel name, since the process started: what tests read
/// to know that our kernel ran (an op that fell back to torch would otherwise compare the
/// reference with itself). One uncontended lock per launch.
fn launch_counter() -> &'static Mutex<HashMap<String, u64>> {
    static M: OnceLock<Mutex<HashMap<String, u64>>> = OnceLock::new();
    M.get_or_init(|| Mutex::new(HashMap::new()))
}

fn count_launch(name: &str) {
    let mut m = launch_counter().lock().unwrap_or_else(|p| p.into_inner());
    match m.get_mut(name) {
        Some(n) => *n += 1,
        None => {
            m.insert(name.to_string(), 1);
        }
    }
}

/// (kernel name, launches the driver accepted) for every kernel launched so far.
pub fn launch_counts() -> Vec<(String, u64)> {
    let m = launch_counter().lock().unwrap_or_else(|p| p.into_inner());
    let mut v: Vec<(String, u64)> = m.iter().map(|(k, n)| (k.clone(), *n)).collect();
    v.sort();
    v
}

/// Launches `name` from the embedded fatbin on `stream` (a raw `CUstream`, 0 = legacy
/// default). Asynchronous: no host synchronisation; launch errors are reported.
pub fn launch(
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared_mem: u32,
    stream: u64,
    device: i32,
    args: &[KernelArg],
) -> Result<()> {
    let f = prepare(name, shared_mem, device)?;
    let mut cells = arg_cells(args);
    let mut params: Vec<*mut c_void> = cells.iter_mut().map(|c| c as *mut u64 as *mut c_void).collect();
    // SAFETY: the caller vouches for the pointers and the argument list of the kernel.
    check(
        unsafe { cu::launch_kernel(f, grid, block, shared_mem, stream as sys::CUstream, &mut params) },
        &format!("launch of {name}"),
    )?;
    count_launch(name);
    Ok(())
}

/// Grids (x) the driver refused as too large to be resident at once, per (context, kernel):
/// later launches start from the largest that fitted.
fn cooperative_limits() -> &'static Mutex<HashMap<(usize, String), u32>> {
    static M: OnceLock<Mutex<HashMap<(usize, String), u32>>> = OnceLock::new();
    M.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Launches `name` cooperatively (`cuLaunchCooperativeKernel`): the driver starts the grid only
/// when all its blocks can be resident at once, so a persistent kernel whose blocks wait for
/// each other (grid barriers) cannot hang on a block that never starts. A grid the driver
/// refuses as too large (fewer SMs than the device has: MPS, green contexts) is halved until
/// it fits: the persistent kernels work with any grid. Returns the grid (x) launched.
pub fn launch_cooperative(
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared_mem: u32,
    stream: u64,
    device: i32,
    args: &[KernelArg],
) -> Result<u32> {
    let f = prepare(name, shared_mem, device)?;
    let ctx = ensure_context(device)? as usize;
    let dev = cu::device::get(device).map_err(|e| CudaError(format!("cuDeviceGet({device}): {e:?}")))?;
    // SAFETY: reads one attribute of a valid device.
    let coop = unsafe { cu::device::get_attribute(dev, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH) }
        .unwrap_or(0);
    if coop == 0 {
        return Err(CudaError(format!(
            "{name} needs a cooperative launch (its blocks wait for each other), which device {device} does not support"
        )));
    }
    let key = (ctx, name.to_string());
    let limit = cooperative_limits().lock().unwrap_or_else(|p| p.into_inner()).get(&key).copied();
    let mut gx = limit.map_or(grid.0, |l| grid.0.min(l)).max(1);
    let mut cells = arg_cells(args);
    let mut params: Vec<*mut c_void> = cells.iter_mut().map(|c| c as *mut u64 as *mut c_void).collect();
    loop {
        // SAFETY: the caller vouches for the pointers and the argument list of the kernel.
        let r = unsafe {
            cu::launch_cooperative_kernel(f, (gx, grid.1, grid.2), block, shared_mem, stream as sys::CUstream, &mut params)
        };
        match r {
            Ok(()) => {
                count_launch(name);
                return Ok(gx);
            }
            Err(cu::DriverError(sys::CUresult::CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE)) if gx > 1 => {
                gx /= 2;
                cooperative_limits().lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), gx);
            }
            Err(e) => {
                return Err(CudaError(format!(
                    "cooperative launch of {name} with {gx} blocks of {} threads refused: {e:?}",
                    block.0 * block.1 * block.2
                )))
            }
        }
    }
}

fn prepare(name: &str, shared_mem: u32, device: i32) -> Result<sys::CUfunction> {
    let f = function(name, device)?;
    if shared_mem > 48 * 1024 {
        // SAFETY: f is a valid function handle.
        check(
            unsafe {
                sys::cuFuncSetAttribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared_mem as i32,
                )
                .result()
            },
            "cuFuncSetAttribute(max dynamic shared memory)",
        )?;
    }
    Ok(f)
}

/// Each argument in its own 8-byte cell; the driver reads the size it expects.
fn arg_cells(args: &[KernelArg]) -> Vec<u64> {
    args.iter()
        .map(|a| match *a {
            KernelArg::Ptr(p) => p,
            KernelArg::I64(v) => v as u64,
            KernelArg::I32(v) => v as u32 as u64,
            KernelArg::U32(v) => v as u64,
            KernelArg::F32(v) => v.to_bits() as u64,
        })
        .collect()
}

/// Page-locks `[ptr, ptr+len)` for DMA (portable, never write-combined: the CPU reads it).
pub fn host_register(ptr: *mut u8, len: usize) -> Result<()> {
    ensure_context(0)?;
    // SAFETY: the caller owns the range for as long as it stays registered.
    check(
        unsafe { sys::cuMemHostRegister_v2(ptr as *mut c_void, len, sys::CU_MEMHOSTREGISTER_PORTABLE).result() },
        "cuMemHostRegister",
    )
}

pub fn host_unregister(ptr: *mut u8) -> Result<()> {
    require_driver()?;
    // SAFETY: ptr was registered by host_register.
    check(unsafe { sys::cuMemHostUnregister(ptr as *mut c_void).result() }, "cuMemHostUnregister")
}

/// Blocks the calling (worker) thread until `event` (a raw `CUevent`/`cudaEvent_t`, e.g.
/// torch's `Event.cuda_event`) has completed. Only this thread waits; the device goes on.
/// The caller creates the event with `CU_EVENT_BLOCKING_SYNC` (torch: `Event(blocking=True)`):
/// otherwise the driver spins this thread on a core until the event completes.
pub fn event_synchronize(event: u64, device: i32) -> Result<()> {
    ensure_context(device)?;
    // SAFETY: the caller keeps the event alive until this returns.
    check(unsafe { sys::cuEventSynchronize(event as sys::CUevent).result() }, "cuEventSynchronize")
}

/// Blocks of `name` that fit on one SM at once with `block_threads` threads and
/// `shared_mem` bytes of dynamic shared memory: sizes persistent grids so every block is
/// co-resident (a grid barrier inside the kernel relies on it).
pub fn max_active_blocks_per_sm(name: &str, block_threads: i32, shared_mem: usize, device: i32) -> Result<i32> {
    let f = function(name, device)?;
    let mut n = 0i32;
    // SAFETY: f is a valid function handle; writes one int.
    check(
        unsafe { sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut n, f, block_threads, shared_mem).result() },
        "cuOccupancyMaxActiveBlocksPerMultiprocessor",
    )?;
    Ok(n)
}

#[cfg(test)]
mod launch_count_tests {
    use super::*;

    fn count_of(name: &str) -> u64 {
        launch_counts().into_iter().find(|(k, _)| k == name).map_or(0, |(_, n)| n)
    }

    #[test]
    fn counts_accepted_launches_per_name() {
        let name = "launch_count_test_kernel";
        assert_eq!(count_of(name), 0);
        count_launch(name);
        count_launch(name);
        count_launch("launch_count_test_other");
        assert_eq!(count_of(name), 2);
        assert_eq!(count_of("launch_count_test_other"), 1);
        let names: Vec<String> = launch_counts().into_iter().map(|(k, _)| k).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }

    #[test]
    fn a_refused_launch_is_not_counted() {
        // No driver here, or (with one) a name the fatbin does not hold: either way an error.
        let name = "launch_count_test_not_in_the_fatbin";
        for cooperative in [false, true] {
            let r = if cooperative {
                launch_cooperative(name, (1, 1, 1), (32, 1, 1), 0, 0, 0, &[]).map(|_| ())
            } else {
                launch(name, (1, 1, 1), (32, 1, 1), 0, 0, 0, &[])
            };
            assert!(r.is_err());
        }
        assert_eq!(count_of(name), 0);
    }
}
