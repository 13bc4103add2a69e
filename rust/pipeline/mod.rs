//! The transfer pipeline: lock-free free/ready slot queues, the weight stream into device
//! slots and the gradient stream out of them, and the hand-off of landed gradients to AdamW.
