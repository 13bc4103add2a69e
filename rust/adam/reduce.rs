//! Gradient reductions for clipping: the global sum of squares and the finite check.
//!
//! The sum has one canonical order so that it is bit-identical whatever the thread count and
//! SIMD path: the slice is cut into fixed chunks of `CHUNK` elements; inside a chunk, element i
//! goes to f64 lane `i % 16` (the square of an f32 is exact in f64, so FMA or not makes no
//! difference); the 16 lanes fold as a fixed tree; chunk sums add up in chunk order.

use super::simd::SimdLevel;

pub const CHUNK: usize = 1 << 14;
pub const LANES: usize = 16;

#[inline(always)]
fn fold(mut acc: [f64; LANES]) -> f64 {
    let mut half = LANES / 2;
    while half > 0 {
        for j in 0..half {
            acc[j] += acc[j + half];
        }
        half /= 2;
    }
    acc[0]
}

#[inline(always)]
fn tail(x: &[f32], from: usize, acc: &mut [f64; LANES]) {
    for (i, &e) in x.iter().enumerate().skip(from) {
        let d = e as f64;
        acc[i % LANES] += d * d;
    }
}

fn chunk_scalar(x: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    tail(x, 0, &mut acc);
    fold(acc)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{fold, tail, LANES};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn chunk_avx512(x: &[f32]) -> f64 {
        let mut a0 = _mm512_setzero_pd();
        let mut a1 = _mm512_setzero_pd();
        let full = x.len() / LANES * LANES;
        let mut i = 0;
        while i < full {
            let lo = _mm512_cvtps_pd(_mm256_loadu_ps(x.as_ptr().add(i)));
            let hi = _mm512_cvtps_pd(_mm256_loadu_ps(x.as_ptr().add(i + 8)));
            a0 = _mm512_fmadd_pd(lo, lo, a0);
            a1 = _mm512_fmadd_pd(hi, hi, a1);
            i += LANES;
        }
        let mut acc = [0f64; LANES];
        _mm512_storeu_pd(acc.as_mut_ptr(), a0);
        _mm512_storeu_pd(acc.as_mut_ptr().add(8), a1);
        tail(x, full, &mut acc);
        fold(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn chunk_avx2(x: &[f32]) -> f64 {
        let mut a = [_mm256_setzero_pd(); 4];
        let full = x.len() / LANES * LANES;
        let mut i = 0;
        while i < full {
            for (q, aq) in a.iter_mut().enumerate() {
                let d = _mm256_cvtps_pd(_mm_loadu_ps(x.as_ptr().add(i + 4 * q)));
                *aq = _mm256_fmadd_pd(d, d, *aq);
            }
            i += LANES;
        }
        let mut acc = [0f64; LANES];
        for (q, aq) in a.iter().enumerate() {
            _mm256_storeu_pd(acc.as_mut_ptr().add(4 * q), *aq);
        }
        tail(x, full, &mut acc);
        fold(acc)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn finite_avx512(x: &[f32]) -> bool {
        super::finite_body(x)
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn finite_avx2(x: &[f32]) -> bool {
        super::finite_body(x)
    }
}

/// Sum of squares of one chunk (at most `CHUNK` elements) on `level`.
pub fn chunk_sq(level: SimdLevel, x: &[f32]) -> f64 {
    match level {
        SimdLevel::Scalar => chunk_scalar(x),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers only pass levels the hardware supports (checked in mod.rs).
        SimdLevel::Avx2 => unsafe { x86::chunk_avx2(x) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { x86::chunk_avx512(x) },
        #[allow(unreachable_patterns)]
        _ => chunk_scalar(x),
    }
}

/// No early exit inside a block: a branch-free OR over the exponent test vectorises.
#[inline(always)]
fn finite_body(x: &[f32]) -> bool {
    for block in x.chunks(1024) {
        let mut bad = 0u32;
        for &e in block {
            bad |= ((e.to_bits() & 0x7F80_0000) == 0x7F80_0000) as u32;
        }
        if bad != 0 {
            return false;
        }
    }
    true
}

pub fn finite(level: SimdLevel, x: &[f32]) -> bool {
    match level {
        SimdLevel::Scalar => finite_body(x),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in chunk_sq.
        SimdLevel::Avx2 => unsafe { x86::finite_avx2(x) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { x86::finite_avx512(x) },
        #[allow(unreachable_patterns)]
        _ => finite_body(x),
    }
}
