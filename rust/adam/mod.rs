//! CPU AdamW over the host store: its validated hyper-parameters (`AdamW`), the fused step
//! dispatched on the CPU layer's SIMD level and worker pool, and the gradient reductions used
//! for clipping (global squared norm, finite check). The bandwidth roof the benchmarks compare
//! against lives in `roof`, built only with the `roof` feature.
//!
//! Semantics are torch.optim.AdamW's: decoupled weight decay, bias correction, plus a gradient
//! scale factor (clipping) folded into the same pass. Results are bit-identical across SIMD
//! paths and thread counts (see `kernels` for why).

pub mod kernels;
pub mod reduce;
#[cfg(feature = "roof")]
pub mod roof;

use crate::cpu::pool::{self, Pool, SHARD_ALIGN};
use crate::cpu::simd::{self, SimdLevel};
use kernels::{Bufs, Consts};

/// AdamW's hyper-parameters, validated, in f64 as Python (and torch) hold them: the per-step
/// constants are derived in f64 once, then rounded to f32 for the element loop. The values
/// that change every step (the step number and the gradient scale) are separate arguments of
/// the step. The one place the rules live: the Python `AdamW` wraps this struct.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

/// One hyper-parameter of `AdamW`, with the rule its value must meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Lr,
    Beta1,
    Beta2,
    Eps,
    WeightDecay,
}

impl Field {
    pub const ALL: [Field; 5] = [Field::Lr, Field::Beta1, Field::Beta2, Field::Eps, Field::WeightDecay];

    /// The name errors use (with the torch `betas` index for the betas).
    pub fn name(self) -> &'static str {
        match self {
            Field::Lr => "lr",
            Field::Beta1 => "beta1 (betas[0])",
            Field::Beta2 => "beta2 (betas[1])",
            Field::Eps => "eps",
            Field::WeightDecay => "weight_decay",
        }
    }

    /// What a valid value is, as the error says it. lr may be 0 (it is the instantaneous
    /// rate, and a schedule may reach 0); eps may not (it keeps the division finite).
    pub fn rule(self) -> &'static str {
        match self {
            Field::Lr | Field::WeightDecay => "a finite number >= 0",
            Field::Beta1 | Field::Beta2 => "a finite number in [0, 1)",
            Field::Eps => "a finite number > 0",
        }
    }

    pub fn accepts(self, x: f64) -> bool {
        x.is_finite()
            && match self {
                Field::Lr | Field::WeightDecay => x >= 0.0,
                Field::Beta1 | Field::Beta2 => (0.0..1.0).contains(&x),
                Field::Eps => x > 0.0,
            }
    }
}

/// A hyper-parameter that breaks its rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HyperError {
    pub field: Field,
    pub value: f64,
}

impl std::fmt::Display for HyperError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} must be {}, got {:?}", self.field.name(), self.field.rule(), self.value)
    }
}

impl std::error::Error for HyperError {}

impl AdamW {
    /// Checks every value against its `Field` rule, in the order of the arguments.
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Result<AdamW, HyperError> {
        for (field, value) in Field::ALL.into_iter().zip([lr, beta1, beta2, eps, weight_decay]) {
            if !field.accepts(value) {
                return Err(HyperError { field, value });
            }
        }
        Ok(AdamW { lr, beta1, beta2, eps, weight_decay })
    }

    /// The same hyper-parameters with another learning rate (checked).
    pub fn with_lr(&self, lr: f64) -> Result<AdamW, HyperError> {
        AdamW::new(lr, self.beta1, self.beta2, self.eps, self.weight_decay)
    }

    pub fn lr(&self) -> f64 {
        self.lr
    }
    pub fn beta1(&self) -> f64 {
        self.beta1
    }
    pub fn beta2(&self) -> f64 {
        self.beta2
    }
    pub fn eps(&self) -> f64 {
        self.eps
    }
    pub fn weight_decay(&self) -> f64 {
        self.weight_decay
    }
}

/// torch.optim.AdamW's defaults.
impl Default for AdamW {
    fn default() -> Self {
        AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// From this many elements on, the bf16 copy is written with streaming stores (see
/// `kernels::Bufs::stream_w`): a copy this large (2 MiB) does not stay in cache anyway.
pub const STREAM_MIN: usize = 1 << 20;

pub(crate) fn check_level(level: SimdLevel) {
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

pub(crate) fn check_lengths(p: &[f32], g: &[f32], m: &[f32], v: &[f32], w: &Option<&mut [u16]>) {
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

fn check_step(step: u64) {
    assert!(step >= 1, "adamw_step: step must be >= 1 (got {step})");
}

/// One fused pass over the whole slice on the global worker pool; `w_bf16` gets the rounded
/// copy. `step` is the 1-based step being taken (torch increments before the update);
/// `grad_scale` multiplies the gradient first (1.0, or max_norm / norm when clipping).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    w_bf16: Option<&mut [u16]>,
    hyper: &AdamW,
    step: u64,
    grad_scale: f64,
) {
    adamw_step_with(simd::detected(), pool::pool_for(p.len()), p, g, m, v, w_bf16, hyper, step, grad_scale);
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
    hyper: &AdamW,
    step: u64,
    grad_scale: f64,
) {
    check_level(level);
    check_lengths(p, g, m, v, &w_bf16);
    check_step(step);
    let n = p.len();
    let c = Consts::new(hyper, step, grad_scale);
    let b = bufs(p, g, m, v, w_bf16);
    match pool.filter(|p| p.threads() > 1) {
        // SAFETY: the level was checked; chunks are disjoint and in bounds.
        Some(pool) => sharded(pool, n, SHARD_ALIGN, CHUNK, &|s, e| unsafe { run_shard(level, b, s, e, &c) }),
        // SAFETY: as above, one range.
        None => unsafe { run_shard(level, b, 0, n, &c) },
    }
}

/// The raw views the kernels take; the bf16 copy streams past the caches from STREAM_MIN on.
pub(crate) fn bufs(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], w_bf16: Option<&mut [u16]>) -> Bufs {
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
pub(crate) fn sharded(pool: &Pool, n: usize, align: usize, chunk: usize, work: &(dyn Fn(usize, usize) + Sync)) {
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

/// Sum of squares (f64 accumulate, deterministic), on the global pool for large slices.
pub fn grad_sq_norm(g: &[f32]) -> f64 {
    grad_sq_norm_with(simd::detected(), pool::pool_for(g.len()), g)
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
    all_finite_with(simd::detected(), pool::pool_for(g.len()), g)
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

#[cfg(test)]
mod tests;
