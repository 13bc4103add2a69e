//! The transfer pipeline: lock-free free/ready slot rings, and worker lanes that make the
//! host-side copies of the weight and gradient streams and hand landed gradients to AdamW.
//!
//! A `Lane` is one worker thread with a FIFO of jobs; its jobs complete in order, so a ticket
//! (the job's sequence number) is done once the lane's completed counter reaches it. A job may
//! name a ticket of another lane to wait for first (e.g. "update after the gradient landed"),
//! and a CUDA event to synchronise on (the D2H copy that torch queued). Since every dependency
//! points at an earlier job, FIFO lanes cannot deadlock.

pub mod lane;
pub mod slots;

pub use lane::{Job, Lane, Ticket};
pub use slots::SlotRing;
