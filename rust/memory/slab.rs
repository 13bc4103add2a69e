//! One layer's host state in one mapping: fp32 master P, Adam M and V, the optional fp32
//! gradient buffer G and the bf16 compute copy W, each a flat page-aligned segment. G and W
//! come last and adjoin, so the part that crosses PCIe is one contiguous range to pin.

use super::arena::{page_size, HostRegion, MemoryError, RegionOptions, HUGE_PAGE};
use crate::cpu::{bf16::bf16_rne, pool};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Master,
    ExpAvg,
    ExpAvgSq,
    Grad,
    WeightsBf16,
}

impl Part {
    pub const ALL: [Part; 5] = [Part::Master, Part::ExpAvg, Part::ExpAvgSq, Part::Grad, Part::WeightsBf16];

    pub fn name(self) -> &'static str {
        match self {
            Part::Master => "master",
            Part::ExpAvg => "exp_avg",
            Part::ExpAvgSq => "exp_avg_sq",
            Part::Grad => "grad",
            Part::WeightsBf16 => "weights_bf16",
        }
    }

    pub fn from_name(s: &str) -> Option<Part> {
        Part::ALL.into_iter().find(|p| p.name() == s)
    }

    pub fn elem_bytes(self) -> usize {
        if self == Part::WeightsBf16 {
            2
        } else {
            4
        }
    }
}

pub struct LayerSlab {
    region: Arc<HostRegion>,
    numel: usize,
    /// Byte offset of each part in `Part::ALL` order; None for an absent gradient.
    offsets: [Option<usize>; 5],
}

impl LayerSlab {
    /// Maps and places a slab of `numel` parameters. With `pin`, G and W are page-locked when a
    /// driver exists; otherwise (or on failure) the placement's pin note says why not.
    pub fn new(numel: usize, with_grad: bool, opts: &RegionOptions, pin: bool) -> Result<LayerSlab, MemoryError> {
        // Segments large enough for huge pages start on one, so no huge page straddles two
        // kinds of state (the pinned tail then never shares a huge page with P, M, V).
        let seg_align = if opts.huge_pages && numel * 4 >= HUGE_PAGE { HUGE_PAGE } else { page_size() };
        let mut offsets = [None; 5];
        let mut at = 0usize;
        for (i, part) in Part::ALL.into_iter().enumerate() {
            if part == Part::Grad && !with_grad {
                continue;
            }
            offsets[i] = Some(at);
            let bytes = numel.checked_mul(part.elem_bytes()).ok_or_else(|| MemoryError(format!("numel {numel} overflows")))?;
            at = (at + bytes).next_multiple_of(seg_align);
        }
        let region = HostRegion::map(at, opts)?;
        let slab = LayerSlab { region: Arc::new(region), numel, offsets };
        if pin && numel > 0 {
            // G and W cross PCIe: one registration for both (all pinned or none).
            let first = slab.offset(Part::Grad).or(slab.offset(Part::WeightsBf16)).unwrap();
            let end = slab.offset(Part::WeightsBf16).unwrap() + numel * 2;
            if let Err(e) = slab.region.pin(first, end - first) {
                // Recorded in the placement (pin_state "failed", pin_note: why), which the
                // Python store reports; the slab stays usable, wholly pageable.
                debug_assert!(slab.region.placement().pin_state == "failed", "{}", e.0);
            }
        }
        Ok(slab)
    }

    pub fn numel(&self) -> usize {
        self.numel
    }

    pub fn region(&self) -> &Arc<HostRegion> {
        &self.region
    }

    pub fn has_grad(&self) -> bool {
        self.offsets[3].is_some()
    }

    pub fn offset(&self, part: Part) -> Option<usize> {
        self.offsets[Part::ALL.iter().position(|&p| p == part).unwrap()]
    }

    /// Raw pointer to a part's first element; None for an absent gradient.
    pub fn part_ptr(&self, part: Part) -> Option<*mut u8> {
        // SAFETY: offsets lie inside the region by construction.
        self.offset(part).map(|o| unsafe { self.region.as_ptr().add(o) })
    }

    /// Rewrites the bf16 copy W from the master P (round to nearest even, NaN kept NaN), on
    /// the worker pool for large slabs: after P was loaded or edited outside the fused step.
    pub fn sync_weights_bf16(&self) {
        let n = self.numel;
        let p = self.part_ptr(Part::Master).unwrap() as usize;
        let w = self.part_ptr(Part::WeightsBf16).unwrap() as usize;
        let one = |s: usize, e: usize| {
            for i in s..e {
                // SAFETY: i < numel inside both parts; P and W are disjoint.
                unsafe { *(w as *mut u16).add(i) = bf16_rne(*(p as *const f32).add(i)) };
            }
        };
        match pool::pool_for(n) {
            Some(pool) => {
                let t = pool.threads();
                pool.run(&|k| {
                    let (s, e) = pool::shard(n, t, k, pool::SHARD_ALIGN);
                    one(s, e)
                });
            }
            None => one(0, n),
        }
    }

    /// Mutable views of every part, for the fused step.
    ///
    /// # Safety
    /// The caller makes sure nothing else (another thread, a Python tensor view) reads or
    /// writes the same parts while the slices live.
    #[allow(clippy::mut_from_ref, clippy::type_complexity)]
    pub unsafe fn parts_mut(&self) -> (&mut [f32], &mut [f32], &mut [f32], Option<&mut [f32]>, &mut [u16]) {
        let f = |p: Part| unsafe { std::slice::from_raw_parts_mut(self.part_ptr(p).unwrap() as *mut f32, self.numel) };
        (
            f(Part::Master),
            f(Part::ExpAvg),
            f(Part::ExpAvgSq),
            self.has_grad().then(|| f(Part::Grad)),
            unsafe { std::slice::from_raw_parts_mut(self.part_ptr(Part::WeightsBf16).unwrap() as *mut u16, self.numel) },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_page_aligned_disjoint_and_grad_adjoins_weights() {
        for (numel, grad) in [(0usize, false), (1, true), (1000, true), (3 << 20, true), (777, false)] {
            let s = LayerSlab::new(numel, grad, &RegionOptions::default(), true).unwrap();
            let mut spans = Vec::new();
            for p in Part::ALL {
                match s.part_ptr(p) {
                    Some(ptr) => {
                        assert_eq!(ptr as usize % page_size(), 0, "{} unaligned", p.name());
                        spans.push((ptr as usize, ptr as usize + numel * p.elem_bytes()));
                    }
                    None => assert!(p == Part::Grad && !grad),
                }
            }
            for w in spans.windows(2) {
                assert!(w[0].1 <= w[1].0, "parts overlap: {spans:?}");
            }
            let end = spans.last().unwrap().1;
            assert!(end <= s.region().as_ptr() as usize + s.region().len());
            // SAFETY: nothing else views this slab.
            let (p, m, v, g, w) = unsafe { s.parts_mut() };
            p.fill(1.0);
            m.fill(2.0);
            v.fill(3.0);
            w.fill(0x3f80);
            if let Some(g) = g {
                g.fill(4.0);
            }
            // SAFETY: as above.
            let (p, m, v, _, w) = unsafe { s.parts_mut() };
            assert!(p.iter().all(|&x| x == 1.0) && m.iter().all(|&x| x == 2.0) && v.iter().all(|&x| x == 3.0));
            assert!(w.iter().all(|&x| x == 0x3f80));
        }
    }

    #[test]
    fn bf16_copy_follows_the_master_with_round_to_nearest_even() {
        for numel in [5usize, 1 << 16] {
            let s = LayerSlab::new(numel, false, &RegionOptions::default(), false).unwrap();
            // SAFETY: nothing else views this slab.
            let (p, ..) = unsafe { s.parts_mut() };
            let mut x = 0x9E37_79B9u32;
            for e in p.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *e = f32::from_bits(x);
            }
            p[0] = f32::NAN;
            p[1] = f32::from_bits(0x3F80_8000); // a tie: rounds to even
            s.sync_weights_bf16();
            // SAFETY: as above.
            let (p, _, _, _, w) = unsafe { s.parts_mut() };
            for i in 0..numel {
                let want = half::bf16::from_f32(p[i]);
                if want.is_nan() {
                    assert!(half::bf16::from_bits(w[i]).is_nan(), "element {i}");
                } else {
                    assert_eq!(w[i], want.to_bits(), "element {i}: {:e}", p[i]);
                }
            }
        }
    }
}
