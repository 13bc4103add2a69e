"""The public MoE surface: `horizon.moe.flash_moe` (and its torch reference). The op, both of its
paths and the routing it shares live in `horizon.kernels.moe`."""

from .kernels.moe import flash_moe, flash_moe_reference, router_statistics

__all__ = ["flash_moe", "flash_moe_reference", "router_statistics"]
