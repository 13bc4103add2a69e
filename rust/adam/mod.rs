//! CPU AdamW over the host store, the SIMD level it dispatches on, its worker pool, and the
//! gradient reductions used for clipping (global squared norm, finite check).
//!
//! Semantics are torch.optim.AdamW's: decoupled weight decay, bias correction, plus a gradient
//! scale factor (clipping) folded into the same pass. Results are bit-identical across SIMD
//! paths and thread counts (see `kernels` for why).

pub mod kernels;
pub mod pool;
pub mod reduce;
pub mod simd;

use kernels::{Bufs, Consts};
pub use pool::Pool;
use simd::SimdLevel;

/// Hyper-parameters in f64, as Python (and torch) hold them: the per-step constants are
/// derived in f64 once, then rounded to f32 for the element loop.
#[derive(Clone, Copy, Debug)]
pub struct AdamParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1-based: the step being taken (torch increments before the update).
    pub step: u64,
    /// Multiplies the gradient before use (1.0, or max_norm / norm when clipping).
    pub grad_scale: f64,
}

impl Default for AdamParams {
    fn default() -> Self {
        AdamParams { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2, step: 1, grad_scale: 1.0 }
    }
}

/// Shard boundaries are multiples of this many elements: whole AVX-512 vectors, and whole
/// 128-byte line pairs of the bf16 output, so no two threads write the same cache line.
pub const SHARD_ALIGN: usize = 64;

/// From this many elements on, the bf16 copy is written with streaming stores (see
/// `kernels::Bufs::stream_w`): a copy this large (2 MiB) does not stay in cache anyway.
pub const STREAM_MIN: usize = 1 << 20;

/// Below this many elements a step runs on the calling thread: waking workers costs more.
pub const PARALLEL_MIN: usize = 1 << 15;

fn check_level(level: SimdLevel) {
    assert!(
        level <= simd::hardware(),
        "SIMD level {} is not supported by this CPU (best: {})",
        level.name(),
        simd::hardware().name()
    );
}

/// # Safety
/// `level` is supported by this CPU; `[start, end)` is in bounds of every non-null buffer.
unsafe fn run_shard(level: SimdLevel, b: Bufs, start: usize, end: usize, c: &Consts) {
    match level {
        SimdLevel::Scalar => kernels::scalar(b, start, end, c),
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => kernels::x86::avx2(b, start, end, c),
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => kernels::x86::avx512(b, start, end, c),
        #[allow(unreachable_patterns)]
        _ => kernels::scalar(b, start, end, c),
    }
}

fn check_lengths(p: &[f32], g: &[f32], m: &[f32], v: &[f32], w: &Option<&mut [u16]>) {
    let n = p.len();
    assert!(
        g.len() == n && m.len() == n && v.len() == n && w.as_ref().is_none_or(|w| w.len() == n),
        "adamw_step: lengths differ (p {n}, g {}, m {}, v {}, w {:?})",
        g.len(),
        m.len(),
        v.len(),
        w.as_ref().map(|w| w.len())
    );
}

fn check_hp(hp: &AdamParams) {
    assert!(hp.step >= 1, "adamw_step: step must be >= 1 (got {})", hp.step);
}

/// One fused pass over the whole slice on the global worker pool; `w_bf16` gets the rounded copy.
pub fn adamw_step(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], w_bf16: Option<&mut [u16]>, hp: &AdamParams) {
    adamw_step_with(simd::detected(), pool_for(p.len()), p, g, m, v, w_bf16, hp);
}

/// The pool a call over `n` elements uses by default: none (the calling thread) when small.
pub fn pool_for(n: usize) -> Option<&'static Pool> {
    (n >= PARALLEL_MIN).then(pool::global)
}

/// `adamw_step` on an explicit SIMD level and pool (`None`: the calling thread alone). For
/// tests and benchmarks; panics if the CPU lacks `level`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_with(
    level: SimdLevel,
    pool: Option<&Pool>,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    w_bf16: Option<&mut [u16]>,
    hp: &AdamParams,
) {
    check_level(level);
    check_lengths(p, g, m, v, &w_bf16);
    check_hp(hp);
    let n = p.len();
    let c = Consts::new(hp);
    let b = bufs(p, g, m, v, w_bf16);
    match pool.filter(|p| p.threads() > 1) {
        // SAFETY: the level was checked; chunks are disjoint and in bounds.
        Some(pool) => sharded(pool, n, SHARD_ALIGN, CHUNK, &|s, e| unsafe { run_shard(level, b, s, e, &c) }),
        // SAFETY: as above, one range.
        None => unsafe { run_shard(level, b, 0, n, &c) },
    }
}

/// The raw views the kernels take; the bf16 copy streams past the caches from STREAM_MIN on.
fn bufs(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], w_bf16: Option<&mut [u16]>) -> Bufs {
    Bufs {
        p: p.as_mut_ptr(),
        g: g.as_ptr(),
        m: m.as_mut_ptr(),
        v: v.as_mut_ptr(),
        w: w_bf16.map_or(std::ptr::null_mut(), |w| w.as_mut_ptr()),
        stream_w: p.len() >= STREAM_MIN,
    }
}

/// Runs `work(start, end)` over `[0, n)` on `pool`. Thread k owns shard k (static, boundaries
/// multiples of `align`) and works through it in chunks of `chunk` elements from the front;
/// a thread done with its own shard then claims the still unclaimed chunks of the others. On a
/// dedicated machine every thread just does its own shard (same pages every step); where a
/// core is shared with other work, the thread pinned there no longer holds up the whole step.
/// Which thread runs a chunk never changes a result: the work is element-wise, or (for
/// reductions) writes one slot per chunk.
fn sharded(pool: &Pool, n: usize, align: usize, chunk: usize, work: &(dyn Fn(usize, usize) + Sync)) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let t = pool.threads();
    let claimed: Vec<AtomicUsize> = (0..t).map(|_| AtomicUsize::new(0)).collect();
    pool.run(&|k| {
        for j in 0..t {
            let s = (k + j) % t;
            let (a, b) = pool::shard(n, t, s, align);
            let chunks = (b - a).div_ceil(chunk);
            loop {
                let c = claimed[s].fetch_add(1, Ordering::Relaxed);
                if c >= chunks {
                    break;
                }
                work(a + c * chunk, (a + (c + 1) * chunk).min(b));
            }
        }
    });
}

/// Elements per claim of `sharded`: large enough that claiming costs nothing (1.8 MB of
/// traffic), small enough that a straggler's last chunk is short. A multiple of SHARD_ALIGN.
pub const CHUNK: usize = 1 << 16;

/// The memory-bandwidth roof of `adamw_step`: the same loads and stores, no arithmetic.
/// Scribbles over p, m and v (benchmarks only).
pub fn memory_roof_pass(
    pool: Option<&Pool>,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    w_bf16: Option<&mut [u16]>,
) {
    check_lengths(p, g, m, v, &w_bf16);
    let level = simd::detected();
    let n = p.len();
    let b = bufs(p, g, m, v, w_bf16);
    let one = |s: usize, e: usize| unsafe {
        // SAFETY: level is the detected one; the range is in bounds.
        match level {
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => kernels::x86::roof_avx512(b, s, e),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => kernels::x86::roof_avx2(b, s, e),
            _ => kernels::roof_scalar(b, s, e),
        }
    };
    match pool.filter(|p| p.threads() > 1) {
        Some(pool) => sharded(pool, n, SHARD_ALIGN, CHUNK, &one),
        None => one(0, n),
    }
}

/// Sum of squares (f64 accumulate, deterministic), on the global pool for large slices.
pub fn grad_sq_norm(g: &[f32]) -> f64 {
    grad_sq_norm_with(simd::detected(), pool_for(g.len()), g)
}

pub fn grad_sq_norm_with(level: SimdLevel, pool: Option<&Pool>, g: &[f32]) -> f64 {
    check_level(level);
    let chunks = g.len().div_ceil(reduce::CHUNK);
    let mut sums = vec![0f64; chunks];
    match pool.filter(|p| p.threads() > 1) {
        Some(pool) if chunks > 1 => {
            let out = SendPtr(sums.as_mut_ptr());
            // Claims of 4 reduction chunks (64 Ki elements), one result slot per chunk.
            sharded(pool, chunks, 1, 4, &|s, e| {
                let out = &out;
                for c in s..e {
                    let x = &g[c * reduce::CHUNK..((c + 1) * reduce::CHUNK).min(g.len())];
                    // SAFETY: chunk c is claimed by exactly one thread.
                    unsafe { *out.0.add(c) = reduce::chunk_sq(level, x) };
                }
            });
        }
        _ => {
            for (c, x) in g.chunks(reduce::CHUNK).enumerate() {
                sums[c] = reduce::chunk_sq(level, x);
            }
        }
    }
    sums.iter().fold(0.0, |a, s| a + s)
}

struct SendPtr(*mut f64);
// SAFETY: each shard writes its own elements.
unsafe impl Sync for SendPtr {}

/// Whether every element is finite (no inf, no NaN).
pub fn all_finite(g: &[f32]) -> bool {
    all_finite_with(simd::detected(), pool_for(g.len()), g)
}

pub fn all_finite_with(level: SimdLevel, pool: Option<&Pool>, g: &[f32]) -> bool {
    check_level(level);
    match pool.filter(|p| p.threads() > 1) {
        Some(pool) => {
            let bad = std::sync::atomic::AtomicBool::new(false);
            sharded(pool, g.len(), SHARD_ALIGN, CHUNK, &|s, e| {
                if !reduce::finite(level, &g[s..e]) {
                    bad.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            });
            !bad.into_inner()
        }
        _ => reduce::finite(level, g),
    }
}

/// The SIMD levels this CPU can run, lowest first (what the tests sweep over).
pub fn supported_levels() -> Vec<SimdLevel> {
    [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512]
        .into_iter()
        .filter(|&l| l <= simd::hardware())
        .collect()
}

#[cfg(test)]
mod tests;
