//! bf16 from f32, as torch converts: round to nearest even, a NaN kept a (quiet) NaN. The
//! vector paths of the AdamW kernels compute the same bits lane by lane.

/// Round to nearest even; a NaN stays a (quiet) NaN with its sign.
#[inline(always)]
pub fn bf16_rne(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        ((b >> 16) | 0x40) as u16
    } else {
        (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
    }
}
