//! CPU AdamW over the host store, and the SIMD level it dispatches on.

pub mod simd;
