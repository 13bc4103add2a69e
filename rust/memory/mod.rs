//! Host memory: the machine's topology, the NUMA-aware arena (`HostRegion`) and the per-layer
//! slabs built on it that hold every layer's optimizer state and compute copy.

pub mod arena;
pub mod slab;
pub mod topology;

pub use arena::{numa_pages, HostRegion, MemoryError, Placement, RegionOptions};
pub use slab::{LayerSlab, Part};
