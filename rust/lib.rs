//! horizon-native: the Rust core behind `horizon._native`. It owns host memory (arena, layer
//! slabs), CPU AdamW, the transfer pipeline, the disk tier and CUDA driver launches. No Python logic
//! lives here; the PyO3 bindings (feature `python`) are a thin layer in `python/`.
//!
//! Layers, each using only those before it (tests/test_rust_layering.py checks this):
//! `cpu` (topology, worker pool, SIMD level, bf16 rounding) -> `cuda` (driver calls, embedded
//! kernels) -> `memory` (arena, slabs) -> `adam` (the fused step, reductions) -> `pipeline`
//! (lanes, slot rings) -> `offload` (the disk tier) -> `python` (bindings, mirroring the modules above).

pub mod cpu;
pub mod cuda;
pub mod memory;
pub mod adam;
pub mod offload;
pub mod pipeline;

#[cfg(feature = "python")]
mod python;

/// The crate's version, as reported by `horizon doctor`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
