//! Host memory: the machine's topology and the NUMA-aware arena that holds every layer's state.

pub mod topology;
