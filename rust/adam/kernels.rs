//! The per-element AdamW update and the bf16 rounding, once per SIMD level. Every path computes
//! the same expression with the same roundings (one FMA where the others have one, IEEE `sqrt`
//! and `div`, which are correctly rounded everywhere), so all paths give bit-identical results
//! and a shard boundary can fall anywhere without changing a single bit.
//!
//! Per element, in this order:
//!   gs = g * grad_scale
//!   m' = fma(b1, m, omb1 * gs)
//!   v' = fma(b2, v, (omb2 * gs) * gs)
//!   d  = fma(sqrt(v'), inv_sqrt_bc2, eps)
//!   p' = fma(-step_size, m' / d, p * decay)
//!   w  = bf16_rne(p')

use crate::cpu::bf16::bf16_rne;

/// The loop constants, computed in f64 once per call and rounded to f32.
#[derive(Clone, Copy, Debug)]
pub struct Consts {
    pub b1: f32,
    pub omb1: f32,
    pub b2: f32,
    pub omb2: f32,
    pub eps: f32,
    pub neg_step_size: f32,
    pub inv_sqrt_bc2: f32,
    pub decay: f32,
    pub grad_scale: f32,
}

impl Consts {
    pub fn new(hp: &super::AdamW, step: u64, grad_scale: f64) -> Consts {
        let (b1, b2) = (hp.beta1(), hp.beta2());
        let t = step as f64;
        let bc1 = 1.0 - b1.powf(t);
        let bc2 = 1.0 - b2.powf(t);
        let lr = hp.lr();
        Consts {
            b1: b1 as f32,
            omb1: (1.0 - b1) as f32,
            b2: b2 as f32,
            omb2: (1.0 - b2) as f32,
            eps: hp.eps() as f32,
            neg_step_size: (-(lr / bc1)) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
            decay: (1.0 - lr * hp.weight_decay()) as f32,
            grad_scale: grad_scale as f32,
        }
    }
}

/// One element. Shared by the scalar path and the tails of the AVX2 path; inlined into a
/// `target_feature(fma)` caller `mul_add` is one vfmadd, elsewhere it is libm's exact fmaf.
#[inline(always)]
pub fn update_one(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, c: &Consts) -> f32 {
    let gs = g * c.grad_scale;
    let m1 = c.b1.mul_add(*m, c.omb1 * gs);
    let v1 = c.b2.mul_add(*v, (c.omb2 * gs) * gs);
    let d = v1.sqrt().mul_add(c.inv_sqrt_bc2, c.eps);
    let p1 = c.neg_step_size.mul_add(m1 / d, *p * c.decay);
    *m = m1;
    *v = v1;
    *p = p1;
    p1
}

/// Raw buffers of one shard; `w` may be null (no bf16 copy wanted).
#[derive(Clone, Copy)]
pub struct Bufs {
    pub p: *mut f32,
    pub g: *const f32,
    pub m: *mut f32,
    pub v: *mut f32,
    pub w: *mut u16,
    /// Write the bf16 copy with non-temporal stores. Worth it for buffers larger than the
    /// caches: the copy is read next by the GPU's DMA, not by this CPU, and streaming skips
    /// the read-for-ownership of every line (4 of 32 bytes per parameter otherwise).
    pub stream_w: bool,
}

/// Elements to handle one by one (or under a mask) before `w + i` is `align`-byte aligned
/// (`w` comes from a `&mut [u16]`, so it is 2-byte aligned and this always gets there).
#[inline(always)]
pub(crate) fn peel(w: *mut u16, start: usize, end: usize, align: usize) -> usize {
    let addr = w as usize + 2 * start;
    (((align - addr % align) % align) / 2).min(end - start)
}
// SAFETY: shards touch disjoint ranges; the caller of the step vouches for the buffers.
unsafe impl Send for Bufs {}
unsafe impl Sync for Bufs {}

/// # Safety
/// `[start, end)` is in bounds of every non-null buffer.
pub unsafe fn scalar(b: Bufs, start: usize, end: usize, c: &Consts) {
    for i in start..end {
        let pi = update_one(&mut *b.p.add(i), *b.g.add(i), &mut *b.m.add(i), &mut *b.v.add(i), c);
        if !b.w.is_null() {
            *b.w.add(i) = bf16_rne(pi);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::{bf16_rne, peel, update_one, Bufs, Consts};
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 and FMA are available; `[start, end)` is in bounds of every non-null buffer.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2(b: Bufs, start: usize, end: usize, c: &Consts) {
        let b1 = _mm256_set1_ps(c.b1);
        let omb1 = _mm256_set1_ps(c.omb1);
        let b2 = _mm256_set1_ps(c.b2);
        let omb2 = _mm256_set1_ps(c.omb2);
        let eps = _mm256_set1_ps(c.eps);
        let nss = _mm256_set1_ps(c.neg_step_size);
        let ibc2 = _mm256_set1_ps(c.inv_sqrt_bc2);
        let decay = _mm256_set1_ps(c.decay);
        let gsc = _mm256_set1_ps(c.grad_scale);
        let one = _mm256_set1_epi32(1);
        let round = _mm256_set1_epi32(0x7FFF);
        let quiet = _mm256_set1_epi32(0x40);
        let want_w = !b.w.is_null();
        let stream = want_w && b.stream_w;
        // The update is element-wise, so where the vectors start does not change a bit: when
        // streaming, a scalar head first brings w + i to a 16-byte boundary.
        let mut i = start;
        if stream {
            let head = start + peel(b.w, start, end, 16);
            while i < head {
                let pi = update_one(&mut *b.p.add(i), *b.g.add(i), &mut *b.m.add(i), &mut *b.v.add(i), c);
                *b.w.add(i) = bf16_rne(pi);
                i += 1;
            }
        }
        while i + 8 <= end {
            let gs = _mm256_mul_ps(_mm256_loadu_ps(b.g.add(i)), gsc);
            let m = _mm256_fmadd_ps(b1, _mm256_loadu_ps(b.m.add(i)), _mm256_mul_ps(omb1, gs));
            let v = _mm256_fmadd_ps(b2, _mm256_loadu_ps(b.v.add(i)), _mm256_mul_ps(_mm256_mul_ps(omb2, gs), gs));
            let d = _mm256_fmadd_ps(_mm256_sqrt_ps(v), ibc2, eps);
            let p = _mm256_fmadd_ps(nss, _mm256_div_ps(m, d), _mm256_mul_ps(_mm256_loadu_ps(b.p.add(i)), decay));
            _mm256_storeu_ps(b.m.add(i), m);
            _mm256_storeu_ps(b.v.add(i), v);
            _mm256_storeu_ps(b.p.add(i), p);
            if want_w {
                let bits = _mm256_castps_si256(p);
                let hi = _mm256_srli_epi32::<16>(bits);
                let r = _mm256_srli_epi32::<16>(_mm256_add_epi32(bits, _mm256_add_epi32(round, _mm256_and_si256(hi, one))));
                let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(p, p));
                let r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, quiet), nan);
                let packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r));
                if stream {
                    _mm_stream_si128(b.w.add(i) as *mut __m128i, packed);
                } else {
                    _mm_storeu_si128(b.w.add(i) as *mut __m128i, packed);
                }
            }
            i += 8;
        }
        while i < end {
            let pi = update_one(&mut *b.p.add(i), *b.g.add(i), &mut *b.m.add(i), &mut *b.v.add(i), c);
            if want_w {
                *b.w.add(i) = bf16_rne(pi);
            }
            i += 1;
        }
        if stream {
            // Streaming stores are weakly ordered: make them visible before the shard reports.
            _mm_sfence();
        }
    }

    /// # Safety
    /// AVX-512F is available; `[start, end)` is in bounds of every non-null buffer.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512(b: Bufs, start: usize, end: usize, c: &Consts) {
        let b1 = _mm512_set1_ps(c.b1);
        let omb1 = _mm512_set1_ps(c.omb1);
        let b2 = _mm512_set1_ps(c.b2);
        let omb2 = _mm512_set1_ps(c.omb2);
        let eps = _mm512_set1_ps(c.eps);
        let nss = _mm512_set1_ps(c.neg_step_size);
        let ibc2 = _mm512_set1_ps(c.inv_sqrt_bc2);
        let decay = _mm512_set1_ps(c.decay);
        let gsc = _mm512_set1_ps(c.grad_scale);
        let one = _mm512_set1_epi32(1);
        let round = _mm512_set1_epi32(0x7FFF);
        let quiet = _mm512_set1_epi32(0x40);
        let want_w = !b.w.is_null();
        let stream = want_w && b.stream_w;
        // Head and tail run through the same body under a lane mask (masked-off lanes load
        // zeros and store nothing). The update is element-wise, so where the vectors start
        // does not change a bit: when streaming, a masked head brings w + i to 32 bytes.
        let mut i = start;
        let mut next = if stream { start + peel(b.w, start, end, 32) } else { start };
        if next == start {
            next = (start + 16).min(end);
        }
        while i < end {
            let k: __mmask16 = if next - i >= 16 { 0xFFFF } else { (1u16 << (next - i)) - 1 };
            let gs = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, b.g.add(i)), gsc);
            let m = _mm512_fmadd_ps(b1, _mm512_maskz_loadu_ps(k, b.m.add(i)), _mm512_mul_ps(omb1, gs));
            let v = _mm512_fmadd_ps(b2, _mm512_maskz_loadu_ps(k, b.v.add(i)), _mm512_mul_ps(_mm512_mul_ps(omb2, gs), gs));
            let d = _mm512_fmadd_ps(_mm512_sqrt_ps(v), ibc2, eps);
            let p = _mm512_fmadd_ps(nss, _mm512_div_ps(m, d), _mm512_mul_ps(_mm512_maskz_loadu_ps(k, b.p.add(i)), decay));
            _mm512_mask_storeu_ps(b.m.add(i), k, m);
            _mm512_mask_storeu_ps(b.v.add(i), k, v);
            _mm512_mask_storeu_ps(b.p.add(i), k, p);
            if want_w {
                let bits = _mm512_castps_si512(p);
                let hi = _mm512_srli_epi32::<16>(bits);
                let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, _mm512_add_epi32(round, _mm512_and_si512(hi, one))));
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(p, p);
                let r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, quiet));
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
            // Streaming stores are weakly ordered: make them visible before the shard reports.
            _mm_sfence();
        }
    }
}
