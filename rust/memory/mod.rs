//! Host memory: the NUMA-aware arena (`HostRegion`) and the per-layer slabs built on it that
//! hold every layer's optimizer state and compute copy. Below AdamW: it uses the CPU layer
//! (topology, pool, bf16 rounding) and the CUDA driver (page-locking), nothing above.

pub mod arena;
pub mod slab;

pub use arena::{numa_pages, HostRegion, MemoryError, Placement, RegionOptions};
pub use slab::{LayerSlab, Part};
