//! The CPU underneath everything else: the machine's topology (NUMA nodes, the CPUs this
//! process may use, host RAM), the pinned worker pool that parallel passes run on, the SIMD
//! level chosen at run time, and the scalar bf16 rounding. Depends on nothing else in the crate.

pub mod bf16;
pub mod pool;
pub mod simd;
pub mod topology;

pub use pool::Pool;
pub use simd::SimdLevel;
