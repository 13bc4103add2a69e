//! The memory-bandwidth roof of the fused AdamW step, for the benchmarks only (cargo feature
//! `roof`; not in the shipped module): a pass with AdamW's exact loads and stores and no
//! arithmetic to speak of, sharded on the same pool the step uses. It scribbles over p, m and
//! v (each is XORed with g, so a second pass restores them exactly).
//!
//! Benchmarks: `cargo bench --features roof` (the bench requires the feature); for the Python
//! comparison (benches/adam_vs_peers.py), build the module with
//! `maturin develop --release --features python,pyo3/extension-module,roof`.

use super::kernels::{peel, Bufs};
use super::{bufs, check_lengths, sharded, CHUNK};
use crate::cpu::pool::{Pool, SHARD_ALIGN};
use crate::cpu::simd::{self, SimdLevel};

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
            SimdLevel::Avx512 => x86::avx512(b, s, e),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => x86::avx2(b, s, e),
            _ => scalar(b, s, e),
        }
    };
    match pool.filter(|p| p.threads() > 1) {
        Some(pool) => sharded(pool, n, SHARD_ALIGN, CHUNK, &one),
        None => one(0, n),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{peel, Bufs};
    use std::arch::x86_64::*;

    /// A pass with AdamW's exact memory traffic (reads p, g, m, v; writes p, m, v and, when
    /// asked, the bf16 copy) and no arithmetic to speak of: the bandwidth roof of the update.
    ///
    /// # Safety
    /// AVX-512F is available; `[start, end)` is in bounds of every non-null buffer.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512(b: Bufs, start: usize, end: usize) {
        let want_w = !b.w.is_null();
        let stream = want_w && b.stream_w;
        let mut i = start;
        let mut next = if stream { start + peel(b.w, start, end, 32) } else { start };
        if next == start {
            next = (start + 16).min(end);
        }
        while i < end {
            let k: __mmask16 = if next - i >= 16 { 0xFFFF } else { (1u16 << (next - i)) - 1 };
            let g = _mm512_castps_si512(_mm512_maskz_loadu_ps(k, b.g.add(i)));
            let p = _mm512_xor_si512(_mm512_castps_si512(_mm512_maskz_loadu_ps(k, b.p.add(i))), g);
            let m = _mm512_xor_si512(_mm512_castps_si512(_mm512_maskz_loadu_ps(k, b.m.add(i))), g);
            let v = _mm512_xor_si512(_mm512_castps_si512(_mm512_maskz_loadu_ps(k, b.v.add(i))), g);
            _mm512_mask_storeu_ps(b.m.add(i), k, _mm512_castsi512_ps(m));
            _mm512_mask_storeu_ps(b.v.add(i), k, _mm512_castsi512_ps(v));
            _mm512_mask_storeu_ps(b.p.add(i), k, _mm512_castsi512_ps(p));
            if want_w {
                let r = _mm512_srli_epi32::<16>(p);
                if stream && k == 0xFFFF {
                    _mm256_stream_si256(b.w.add(i) as *mut __m256i, _mm512_cvtepi32_epi16(r));
                } else {
                    _mm512_mask_cvtepi32_storeu_epi16(b.w.add(i) as *mut i16, k, r);
                }
            }
            i = next;
            next = (i + 16).min(end);
        }
        if stream {
            _mm_sfence();
        }
    }

    /// The AVX2 twin of `avx512`.
    ///
    /// # Safety
    /// AVX2 is available; `[start, end)` is in bounds of every non-null buffer.
    #[target_feature(enable = "avx2")]
    pub unsafe fn avx2(b: Bufs, start: usize, end: usize) {
        let stream = !b.w.is_null() && b.stream_w;
        let mut i = start;
        if stream {
            let head = start + peel(b.w, start, end, 16);
            super::scalar(b, i, head);
            i = head;
        }
        while i + 8 <= end {
            let g = _mm256_loadu_si256(b.g.add(i) as *const __m256i);
            let p = _mm256_xor_si256(_mm256_loadu_si256(b.p.add(i) as *const __m256i), g);
            let m = _mm256_xor_si256(_mm256_loadu_si256(b.m.add(i) as *const __m256i), g);
            let v = _mm256_xor_si256(_mm256_loadu_si256(b.v.add(i) as *const __m256i), g);
            _mm256_storeu_si256(b.m.add(i) as *mut __m256i, m);
            _mm256_storeu_si256(b.v.add(i) as *mut __m256i, v);
            _mm256_storeu_si256(b.p.add(i) as *mut __m256i, p);
            if !b.w.is_null() {
                let r = _mm256_srli_epi32::<16>(p);
                let packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r));
                if stream {
                    _mm_stream_si128(b.w.add(i) as *mut __m128i, packed);
                } else {
                    _mm_storeu_si128(b.w.add(i) as *mut __m128i, packed);
                }
            }
            i += 8;
        }
        super::scalar(b, i, end);
        if stream {
            _mm_sfence();
        }
    }
}

/// # Safety
/// `[start, end)` is in bounds of every non-null buffer.
pub unsafe fn scalar(b: Bufs, start: usize, end: usize) {
    for i in start..end {
        let g = (*b.g.add(i)).to_bits();
        let p = (*b.p.add(i)).to_bits() ^ g;
        *b.m.add(i) = f32::from_bits((*b.m.add(i)).to_bits() ^ g);
        *b.v.add(i) = f32::from_bits((*b.v.add(i)).to_bits() ^ g);
        *b.p.add(i) = f32::from_bits(p);
        if !b.w.is_null() {
            *b.w.add(i) = (p >> 16) as u16;
        }
    }
}
