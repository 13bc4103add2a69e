//! The disk tier: every layer's fp32 master and Adam m, v in a file on a local disk, streamed
//! through host staging buffers once per step, in the order the engine updates the layers.
//!
//! - `layout`: where a layer's parts sit in its file (page-aligned, one contiguous state range)
//!   and the staging ring the reads land in.
//! - `files`: the tier's directory: a lock, one preallocated file per layer, a manifest; the
//!   direct-I/O probe and the file-system facts (`statvfs`, tmpfs).
//! - `io`: asynchronous reads, writes and `fdatasync`s, on io_uring where the kernel allows it
//!   and on a pool of `pread`/`pwrite` threads otherwise, chosen at run time.
//! - `tier`: the runtime: read-ahead into staging, the fused AdamW on the staging buffers, the
//!   write-back and its durability, the init / load / export transfers.
//! - `roof`: the sequential direct-I/O bandwidth of a directory (`horizon doctor --disk`).

pub mod files;
pub mod io;
pub mod layout;
pub mod roof;
pub mod tier;

pub use files::{fs_info, probe_direct, FsInfo, TierFiles};
pub use io::IoChoice;
pub use layout::{LayerLayout, StagingRing, ALIGN};
pub use tier::{Completion, DiskTier, Durability, GradSource, TierOptions, TierStats};

#[cfg(test)]
mod tests;
