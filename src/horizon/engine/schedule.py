"""The layer-major training step (docs/engine.md).

Per step: a forward over every micro-batch one layer at a time with autograd off, keeping
each block's input as its checkpoint; the final norm + LM head + cross-entropy fused and
chunked, with autograd on for the head only, which yields dLoss/dh; a reverse layer-major
backward that streams each block in again, recomputes it from its checkpoint with autograd on
for that block only and asks `torch.autograd.grad` for (input, flat parameters), passing the
input gradient down by hand. Each layer's gradient is accumulated on the device over the
step's micro-batches and leaves the device once, into a landing slot from which a Rust worker
runs AdamW (without clipping), or into the slab's gradient buffer (with clipping; the updates
are queued embedding-first after the global norm is known, so the next step's forward of
layer i waits for Adam(i) only).

Weights stream through `WeightStream` (S >= 2 slots). Which host copy streams: the fp32
master when the compute dtype is fp32 (so the CPU path equals an fp32 reference), the bf16
copy that AdamW writes when it is bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _native, kernels
from ..errors import HorizonError
from ..kernels.rope import RotaryEmbedding
from ..models import layer_active_parameters, micro_batch_inputs, shift_labels
from .activations import (ActivationBudget, ActivationStore, HostPlacement, KeptUnit, offload_cheaper,
                          param_leaves, step_flops, tensor_storages)
from .ledger import MemoryLedger, SavedActivations, host_memory, set_malloc_policy, tensor_bytes
from .pipeline import GradientLanding, WeightStream
from .state import HostLayer, HostModel


def _accumulate(acc: torch.Tensor, grad: torch.Tensor, *, first: bool) -> None:
    """acc (fp32) = grad (first micro-batch: no zero-fill needed) or acc += grad."""
    if first:
        acc.copy_(grad)
    else:
        kernels.accumulate_grad_(acc, grad)


def accumulate_param_grads(acc: torch.Tensor, layout, grads: list, *, first: bool) -> None:
    """acc (the layer's flat fp32 gradient) = or += the per-parameter `grads` (in the layout's
    order; None: the parameter had no part in the loss); on the first micro-batch the
    alignment padding is zeroed too (acc's content is stale until then)."""
    for view, g in zip(layout.views(acc).values(), grads):
        if g is None:
            if first:
                view.zero_()
        else:
            _accumulate(view, g, first=first)
    if first:
        for lo, hi in layout.gaps():
            acc[lo:hi].zero_()


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    skipped: bool
    skipped_layer_updates: int  # layers whose update a skipped step left out (all of them, or 0)
    tokens: int


class _Streamer:
    """Walks a step's list of (stream key, layer) in order, keeping at most S layers in the
    slots: a prefetch is issued whenever a slot is free, so the copy of the next layers
    overlaps the compute of the current one."""

    def __init__(self, engine: "LayerMajorEngine", items: list):
        self.e = engine
        self.items = items
        self.next = 0
        self.inflight = 0
        self.fill()

    def fill(self) -> None:
        e = self.e
        while self.next < len(self.items) and self.inflight < e.stream.n_slots:
            key, layer = self.items[self.next]
            if key[0] == "fwd":
                e._before_forward_read(layer)
            e.stream.prefetch(key, e.weight_source(layer))
            self.next += 1
            self.inflight += 1

    def acquire(self, key) -> torch.Tensor:
        self.fill()
        return self.e.stream.acquire(key)

    def release(self, key) -> None:
        self.e.stream.release(key)
        self.inflight -= 1
        self.fill()

    def abandon(self) -> None:
        self.e.stream.release_all()
        self.inflight = 0
        self.next = len(self.items)


class LayerMajorEngine:
    # The CPU device: blocks compute on their host weights in place (WeightStream alias_host):
    # the copy into a slot would be a memcpy of the same memory. Safe because a step's updates
    # wait for its verdict and a layer's next read waits for its update (`_before_forward_read`).
    alias_host_weights = True
    def __init__(
        self,
        model: HostModel,
        device: torch.device,
        compute_dtype: torch.dtype,
        *,
        grad_clip: float | None,
        track_grad_norm: bool = True,
        n_slots: int = 2,
        landing_slots: int | None = None,
        offload_checkpoints: bool | None = None,
        loss_chunk_size: int | None = None,
        activation_memory: int | None = None,
    ):
        if n_slots < 2:
            raise HorizonError(f"n_slots must be >= 2 (one layer computes while the next streams in), got {n_slots}")
        if activation_memory is not None and (isinstance(activation_memory, bool)
                                              or not isinstance(activation_memory, int) or activation_memory < 0):
            raise HorizonError(f"activation_memory must be None (auto) or bytes >= 0, got {activation_memory!r}")
        if landing_slots is not None and (isinstance(landing_slots, bool) or not isinstance(landing_slots, int)
                                          or landing_slots < 1):
            raise HorizonError(f"landing_slots must be None (auto) or an int >= 1, got {landing_slots!r}")
        self.model = model
        self.spec = model.spec
        self.device = device
        self.dtype = compute_dtype
        self.grad_clip = grad_clip
        self.track_grad_norm = track_grad_norm
        self.loss_chunk_size = loss_chunk_size
        self._cuda = device.type == "cuda"
        if not self._cuda:
            set_malloc_policy(model.malloc_policy)
        self.device_ledger = MemoryLedger()
        self.host_ledger = MemoryLedger()

        # CUDA: the peak is measured per step against a baseline read at the step's start
        # (see _begin_device_peak), so memory of objects that are not this engine's (a previous
        # trainer not yet freed, the caller's tensors) never counts.
        self._cuda_base = None
        self._cuda_peak = 0

        max_numel = max(layer.numel for layer in model.layers)
        # One pipeline (three worker lanes) per engine, so its counters are this engine's.
        self.pipeline = _native.Pipeline()
        self.stream = WeightStream(n_slots, max_numel, device, compute_dtype, pipeline=self.pipeline,
                                   alias_host=self.alias_host_weights)
        make_landing = getattr(model, "make_landing", None)  # the disk tier brings its own
        self.landing = (make_landing or GradientLanding)(landing_slots or 2, max_numel, device, pipeline=self.pipeline)
        self.device_ledger.hold("weight-slots", self.stream.device_bytes)
        self.host_ledger.hold("slabs", model.host_bytes)
        self.host_ledger.hold("landing-slots", self.landing.host_bytes)

        # The step's gradients accumulate in persistent fp32 device buffers: "wide" for the
        # head and the embedding (never in use at once, except the tied embedding's, which is
        # "wide" while the head's goes to the ring), and two that the blocks alternate, so a
        # block computes while the previous block's gradient is still being copied out.
        embed, blocks, head = model.layers[0], model.layers[1:-1], model.layers[-1]
        tied = self.spec.tie_word_embeddings
        ring = max([b.numel for b in blocks] + ([head.numel] if tied else []) + [1])
        wide = embed.numel if tied else max(embed.numel, head.numel)
        self._grad_bufs = {name: torch.empty(n, dtype=torch.float32, device=device)
                           for name, n in (("wide", wide), ("ring0", ring), ("ring1", ring))}
        self.device_ledger.hold("grad-buffers", tensor_bytes(list(self._grad_bufs.values())))
        self._ring_turn = 0
        self.host_syncs = 0  # device -> host reads that wait for the device (one per step)
        self._ckpt_stores: dict = {}
        self._offload_by_tokens: dict = {}

        if offload_checkpoints is None:
            offload_checkpoints = True if not self._cuda else None  # CUDA: decided per step by size
        self._offload_setting = offload_checkpoints
        self.layer_landings: dict = {}  # key -> landings in the last step (the once-per-step invariant)
        # stateful for the dynamic / longrope types; the hf path runs the model's own rotary
        self.rotary = RotaryEmbedding(self.spec.rope) if hasattr(self.spec, "rope") else None
        self._rope_cache: dict = {}
        # The activation budget (docs/engine.md "Keeping activations"): None = auto.
        self.activation_memory = activation_memory
        self.activations = ActivationBudget(self.device_ledger, self.host_ledger)
        # Placement "offload" (CUDA): kept units in page-locked host memory when the copies cost
        # less than the recompute, by rates measured once on this device (`_device_rates`).
        self._placement = HostPlacement(device)
        self._rates = None
        self._unit_tokens = 0
        self._host_budget_by_tokens: dict = {}
        if self._cuda:
            self.activations.cheaper = self._offload_cheaper
        self._auto_budget_by_tokens: dict = {}
        self._active = layer_active_parameters(self.spec)
        self.flops_last_step = 0

    # ------------------------------------------------------------------ helpers
    def weight_source(self, layer: HostLayer) -> torch.Tensor:
        s = layer.slab
        return s.master if self.dtype == torch.float32 else s.weights_bf16

    @property
    def write_bf16(self) -> bool:
        return self.dtype != torch.float32

    def peak_device_bytes(self) -> int:
        if self._cuda:
            return max(self._cuda_peak, self._step_device_peak())
        return self.device_ledger.peak

    def _begin_device_peak(self) -> None:
        """CUDA: a step's peak is measured against a baseline read at its start: what is
        allocated then, less what this engine holds between steps (its ledger: the weight
        slots and other persistent buffers). Read from the allocator's host-side counters
        (no device synchronisation)."""
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_base = torch.cuda.memory_allocated(self.device) - self.device_ledger.current

    def _end_device_peak(self) -> None:
        if self._cuda and self._cuda_base is not None:
            self._cuda_peak = max(self._cuda_peak, self._step_device_peak())
            self._cuda_base = None

    def _step_device_peak(self) -> int:
        if self._cuda_base is None:  # between steps: what the engine holds
            return self.device_ledger.current
        return max(0, torch.cuda.max_memory_allocated(self.device) - self._cuda_base)

    def peak_host_bytes(self) -> int:
        return self.host_ledger.peak

    def _offload(self, tokens: int) -> bool:
        if self._offload_setting is not None:
            return bool(self._offload_setting)
        hit = self._offload_by_tokens.get(tokens)
        if hit is None:  # decided once per batch size (the free memory is asked for once)
            elem = torch.empty((), dtype=self.dtype).element_size()
            need = (self.spec.num_layers + 1) * tokens * self.spec.hidden_size * elem
            free, _total = torch.cuda.mem_get_info(self.device)
            hit = self._offload_by_tokens[tokens] = need > free // 4
        return hit

    def _activation_budget(self, tokens: int, n_blocks: int) -> int:
        """The bytes of saved activations this step may keep: the option's, or for auto what
        the device has left (on the CPU device: the host's available memory) after what the step
        needs besides (the other blocks' checkpoints on the device, the backward's live
        activations: twice the largest kept block) and a margin of max(1 GiB, 10%) of the
        device; decided once per batch size, like the checkpoints' placement."""
        if self.activation_memory is not None:
            return self.activation_memory
        hit = self._auto_budget_by_tokens.get(tokens)
        if hit is None:
            if self._cuda:
                free, total = torch.cuda.mem_get_info(self.device)
                free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
                elem = torch.empty((), dtype=self.dtype).element_size()
                if not self._offload(tokens):
                    free -= n_blocks * tokens * self.spec.hidden_size * elem
            else:
                free, total = host_memory()
            hit = self._auto_budget_by_tokens[tokens] = max(0, free - max(1 << 30, total // 10))
        # auto: room for the backward's live activations (two units) and, on CUDA, for the
        # offloaded units of two blocks back on the device (one computing, one arriving)
        n_mb = -(-tokens // self._unit_tokens) if self._unit_tokens else 1
        self.activations.reserve_factor = 2 + (2 * n_mb if self._cuda else 0)
        return hit

    def _host_activation_budget(self, tokens: int) -> int:
        """Host bytes for offloaded activations (CUDA only; on the CPU device kept units already
        live in host memory): with auto, what the host has available less max(1 GiB, 10%);
        with a fixed budget, none (the count is the whole budget)."""
        if not self._cuda or self.activation_memory is not None:
            return 0
        hit = self._host_budget_by_tokens.get(tokens)
        if hit is None:
            free, total = host_memory()
            hit = self._host_budget_by_tokens[tokens] = max(0, free - max(1 << 30, total // 10))
        return hit

    def _device_rates(self) -> tuple:
        """(H2D bytes/s from page-locked memory, matmul FLOP/s in the compute dtype) of this
        device, measured once (a 64 MiB copy and a 4096^2 matmul, best of three each)."""
        if self._rates is None:
            n = 64 << 20
            src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            dst = torch.empty(n, dtype=torch.uint8, device=self.device)
            a = torch.randn(4096, 4096, dtype=self.dtype, device=self.device)
            best_copy = best_mm = math.inf
            for _ in range(3):
                e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
                e[0].record()
                dst.copy_(src, non_blocking=True)
                e[1].record()
                torch.mm(a, a)
                e[2].record()
                e[2].synchronize()
                best_copy = min(best_copy, e[0].elapsed_time(e[1]) * 1e-3)
                best_mm = min(best_mm, e[1].elapsed_time(e[2]) * 1e-3)
            self._rates = (n / best_copy, 2 * 4096 ** 3 / best_mm)
        return self._rates

    def _offload_cheaper(self, key, nbytes: int) -> bool:
        """The cost model of placement "offload": bringing a unit's `nbytes` back to the device
        takes less than recomputing its forward (2 FLOPs per active parameter and token)."""
        h2d, flops = self._device_rates()
        return offload_cheaper(nbytes, self._active[key], self._unit_tokens, h2d, flops)

    def _count_flops(self, n_tokens: int, n_mb: int) -> None:
        per_mb = n_tokens / max(1, n_mb)
        recomputed = {key: per_mb * units.count("recompute") for key, units in self.activations.last.items()}
        self.flops_last_step = step_flops(self._active, self.spec.tie_word_embeddings, n_tokens, recomputed)

    def activation_stats(self) -> dict:
        """The last step's activation plan as it ran: per block, "keep" (every micro-batch's
        forward kept its saved tensors on the device), "offload" (kept in host memory),
        "recompute" (none kept) or "partial" (a mix); the device-kept bytes at their peak; the
        matmul FLOPs; the activation bytes moved between device and host so far (offloaded
        checkpoints and units)."""
        blocks = {key: units[0] if len(set(units)) == 1 else "partial"
                  for key, units in self.activations.last.items()}
        return {
            "activation_memory": "auto" if self.activation_memory is None else self.activation_memory,
            "activation_blocks": blocks,
            "activation_kept_bytes": self.activations.last_kept_peak,
            "activation_bytes_moved": (sum(store.bytes_moved for store in self._ckpt_stores.values())
                                       + self._placement.bytes_moved),
            "flops_per_step": self.flops_last_step,
        }

    def _hold_list(self, name, tensors) -> None:
        self.device_ledger.hold(name, tensor_bytes(tensors))

    # ------------------------------------------------------------------ the step
    def step(self, input_ids: torch.Tensor, labels: torch.Tensor, micro_batch_size: int, *, step: int,
             hyper: _native.AdamW, position_ids=None) -> StepResult:
        """One optimizer step on the whole batch (`input_ids`, `labels` [N, T] on the CPU,
        labels unshifted, HF convention). `step` is the 1-based AdamW step number, `hyper` the
        AdamW hyper-parameters it runs with. `position_ids` [N, T] (CPU int64, validated):
        packed documents, see `models.positions`; None: one document per row."""
        self._begin_device_peak()
        try:
            return self._step(input_ids, labels, micro_batch_size, step=step, hyper=hyper, position_ids=position_ids)
        finally:
            self._end_device_peak()

    def _step(self, input_ids, labels, micro_batch_size, *, step, hyper, position_ids) -> StepResult:
        dev = self.device
        spec = self.spec
        layers = self.model.layers
        embed, blocks, head = layers[0], layers[1:-1], layers[-1]
        tied = spec.tie_word_embeddings
        n_rows, seq = input_ids.shape

        if position_ids is not None:  # a document's first token is no target of the one before
            labels = labels.masked_fill(position_ids == 0, -100)
        shifted = shift_labels(labels)
        n_label_tokens = int((shifted != -100).sum())
        if n_label_tokens == 0:
            raise HorizonError("the batch has no label tokens (all labels are -100 after the shift)")
        # Data parallel: this rank's contiguous share of the step's micro-batches (all of
        # them in a single process); the loss normaliser stays the whole batch's count.
        ids_all, lab_all = input_ids.split(micro_batch_size), shifted.split(micro_batch_size)
        mb_lo, mb_hi = self._micro_batch_share(len(ids_all))
        ids_mb = [self._to_device(t) for t in ids_all[mb_lo:mb_hi]]
        lab_mb = [self._to_device(t) for t in lab_all[mb_lo:mb_hi]]
        n_mb = len(ids_mb)
        inv_tokens = 1.0 / n_label_tokens
        # A template whose prologue is the model's own forward (the hf path) hands each block
        # what that forward hands the layer (position ids included); native blocks take the
        # RoPE tables (and, for packed rows, their documents).
        prologue = getattr(embed.defn.template, "prologue", None)
        rope = self._rope_inputs(position_ids, seq, micro_batch_size, mb_lo, mb_hi) if prologue is None else None
        pos_mb = ([p.to(dev) for p in position_ids.split(micro_batch_size)[mb_lo:mb_hi]]
                  if position_ids is not None else [None] * (mb_hi - mb_lo))
        ckpts = self._checkpoints(n_rows * seq)
        # HF's load-balancing loss couples the MoE layers: E * sum_e f_e * P_e with f and P
        # averaged over all MoE layers and all tokens of the step. The forward gathers the
        # per-expert counts (constants) and probability sums; in the backward each layer's
        # share is coef * E / (n T)^2 * sum_e counts_e * probsum_e(layer).
        aux_coef = spec.router_aux_loss_coef if spec.is_moe else 0.0
        if aux_coef:
            n_moe = len(spec.moe_layers)
            aux_scale = aux_coef * spec.num_experts / float(n_moe * n_rows * seq) ** 2
            route_counts = torch.zeros(spec.num_experts, dtype=torch.float32, device=dev)
            route_probs = torch.zeros(spec.num_experts, dtype=torch.float32, device=dev)

        items = [(("fwd", embed.key), embed)] + [(("fwd", b.key), b) for b in blocks] + [(("fwd", head.key), head)]
        if tied:
            items.append((("head-weight", embed.key), embed))
        items += [(("bwd", b.key), b) for b in reversed(blocks)]
        self.landing.begin_step()
        streamer = _Streamer(self, items)
        budget = self.activations
        self.layer_landings = {}
        self._ring_turn = 0
        self._finite = []  # one 0-dim device flag per landed layer: its gradient holds no NaN/Inf

        try:
            # ---- forward, layer-major, autograd off
            with torch.no_grad():
                slot = streamer.acquire(("fwd", embed.key))
                if prologue is None:
                    views = embed.layout.views(slot)
                    hidden = [embed.defn.template.forward(views, ids) for ids in ids_mb]
                    block_args = [((cos, sin), kw) for cos, sin, kw in rope]
                else:
                    # Each run keeps what its blocks are handed and a graph back to the slot
                    # (the embedding's backward then needs no second stream of its weights).
                    prologue_runs = [prologue(slot, embed.layout, ids, position_ids=p) for ids, p in zip(ids_mb, pos_mb)]
                    hidden = [r.hidden for r in prologue_runs]
                    block_args = [((r,), {}) for r in prologue_runs]
                    self.device_ledger.hold("block-context", sum(r.nbytes for r in prologue_runs))
                streamer.release(("fwd", embed.key))
                self._hold_list("hidden", hidden)
                self._unit_tokens = micro_batch_size * seq
                budget.begin_step(self._activation_budget(n_rows * seq, len(blocks)),
                                  self._host_activation_budget(n_rows * seq))
                context = [tensor_storages(a) for a in block_args]
                for b in blocks:
                    key = ("fwd", b.key)
                    slot = streamer.acquire(key)
                    views = b.layout.views(slot)
                    out, inputs = [], []
                    moe_aux = aux_coef and b.defn.template.kind == "moe"
                    for j, (x, (a, kw)) in enumerate(zip(hidden, block_args)):
                        stats = [] if moe_aux else None
                        if budget.want():
                            unit = KeptUnit(slot, context[j])
                        elif budget.want_host(b.key):
                            unit = KeptUnit(slot, context[j], host=self._placement)
                        else:
                            unit = None
                        if unit is None:
                            y = b.defn.template.forward(views, x, *a, router_stats=stats, **kw)
                        else:
                            # Autograd on, the saved tensors kept for this block's backward.
                            unit.x = x.detach().requires_grad_()
                            with torch.enable_grad(), unit.hooks():
                                y = b.defn.template.forward(unit.params(b.layout), unit.x, *a,
                                                            router_stats=stats, **kw)
                            unit.end_forward()
                            unit.y, unit.extra = y, (stats[0][0] if stats else None)
                            keep = budget.commit if unit.host is None else budget.commit_host
                            if not keep(b.key, j, unit):
                                unit = None  # larger than the room left: recomputed like the rest
                            y = y.detach()
                        budget.note(b.key, j, unit)
                        if stats:
                            route_probs += stats[0][0].detach()
                            route_counts += stats[0][1]
                        out.append(y)
                        inputs.append(x if unit is None else None)
                    streamer.release(key)
                    ckpts.put(b.key, inputs)
                    self.device_ledger.drop("hidden")
                    hidden = out
                    self._hold_list("hidden", hidden)

            # ---- head + loss, autograd on for the head only
            slot = streamer.acquire(("fwd", head.key))
            head_views = param_leaves(head.layout, slot)
            tied_views = {}
            head_weight = None
            if tied:
                tied_views = param_leaves(embed.layout, streamer.acquire(("head-weight", embed.key)))
                head_weight = tied_views["weight"]
            # Persistent gradient buffers (no allocation per layer): the tied embedding's
            # gradient collects the head weight's share now and the scatter's at the end.
            if tied:
                head_acc = self._grad_acc(self._next_ring(), head.numel, zero=n_mb == 0)
                tied_acc = self._grad_acc("wide", embed.numel, zero=n_mb == 0)
            else:
                head_acc, tied_acc = self._grad_acc("wide", head.numel, zero=n_mb == 0), None
            grads_out = []
            loss_parts = []
            wrt = (*head_views.values(), *tied_views.values())
            n_head = len(head_views)
            for i, (h, lab) in enumerate(zip(hidden, lab_mb)):
                h = h.detach().requires_grad_()
                saved = SavedActivations([slot.untyped_storage().data_ptr(), h.untyped_storage().data_ptr()])
                with torch.enable_grad(), saved.hooks():
                    loss_sum = head.defn.template.loss_sum(head_views, h, lab, head_weight, chunk_size=self.loss_chunk_size)
                    scaled = loss_sum * inv_tokens
                self.device_ledger.transient(saved.nbytes)
                # allow_unused: a parameter outside the loss's graph gets a zero gradient.
                g = torch.autograd.grad(scaled, (h,) + wrt, allow_unused=True)
                self.device_ledger.transient(tensor_bytes(list(g)) + tensor_bytes(grads_out))
                grads_out.append(torch.zeros_like(h) if g[0] is None else g[0])
                accumulate_param_grads(head_acc, head.layout, g[1:1 + n_head], first=i == 0)
                if tied:
                    accumulate_param_grads(tied_acc, embed.layout, g[1 + n_head:], first=i == 0)
                loss_parts.append(loss_sum.detach())
                self._hold_list("grads-out", grads_out)
            g = scaled = loss_sum = None  # (a data-parallel rank may have had no micro-batch)
            streamer.release(("fwd", head.key))
            if tied:
                streamer.release(("head-weight", embed.key))
            self.device_ledger.drop("hidden")
            del hidden

            # The loss stays on the device: it is read once, with the norm, at the end. Data
            # parallel: the ranks' loss shares and router statistics add up here (a no-op in a
            # single process), so every rank takes the same decision.
            loss_t = torch.stack(loss_parts).sum() * inv_tokens if loss_parts else torch.zeros((), device=dev)
            self._sum_across_ranks_([loss_t] + ([route_counts, route_probs] if aux_coef else []))
            if aux_coef:
                loss_t = loss_t + aux_scale * (route_counts * route_probs).sum()

            norms = []
            self._land(head, head_acc, norms, step=step, hyper=hyper)
            del head_acc

            # ---- backward, reverse layer-major: recompute each block from its checkpoint
            for i in range(len(blocks) - 1, -1, -1):
                b = blocks[i]
                key = ("bwd", b.key)
                budget.prefetch(b.key, n_mb)
                if i > 0:
                    ckpts.prefetch(blocks[i - 1].key)
                    budget.prefetch(blocks[i - 1].key, n_mb)
                xs = ckpts.take(b.key)
                slot = streamer.acquire(key)
                leaves = param_leaves(b.layout, slot)
                acc = self._grad_acc(self._next_ring(), b.numel, zero=n_mb == 0)
                new_grads = []
                moe_aux = aux_coef and b.defn.template.kind == "moe"
                for j, (x, gy, (a, kw)) in enumerate(zip(xs, grads_out, block_args)):
                    unit = budget.take(b.key, j)
                    if unit is not None:  # kept from the forward: no recompute
                        unit.rebind(slot)
                        outs, grads = (unit.y,), (gy,)
                        if unit.extra is not None:
                            with torch.enable_grad():
                                outs += (aux_scale * (unit.extra * route_counts).sum(),)
                            grads += (None,)
                        self.device_ledger.transient(tensor_bytes(new_grads))
                        gx, *gparams = torch.autograd.grad(outs, (unit.x, *unit.leaves.values()), grads,
                                                           allow_unused=True)
                        budget.release(b.key, j, unit)
                        del unit, outs
                    else:
                        x = x.detach().requires_grad_()
                        saved = SavedActivations([slot.untyped_storage().data_ptr(),
                                                  x.untyped_storage().data_ptr()])
                        stats = [] if moe_aux else None
                        with torch.enable_grad(), saved.hooks():
                            y = b.defn.template.forward(leaves, x, *a, router_stats=stats, **kw)
                            outs, grads = (y,), (gy,)
                            if stats:
                                outs += (aux_scale * (stats[0][0] * route_counts).sum(),)
                                grads += (None,)
                        self.device_ledger.transient(saved.nbytes + tensor_bytes(y) + tensor_bytes(new_grads))
                        gx, *gparams = torch.autograd.grad(outs, (x, *leaves.values()), grads, allow_unused=True)
                        del y, outs
                    # What autograd hands back (a gradient per weight tensor, the input's) beside
                    # the earlier micro-batches' input gradients, until summed into acc.
                    self.device_ledger.transient(tensor_bytes(gparams) + tensor_bytes(gx) + tensor_bytes(new_grads))
                    accumulate_param_grads(acc, b.layout, gparams, first=j == 0)
                    new_grads.append(gx)
                    del gparams
                streamer.release(key)
                ckpts.release(b.key)
                del xs
                grads_out = new_grads
                self._hold_list("grads-out", grads_out)
                self._land(b, acc, norms, step=step, hyper=hyper)
                del acc

            # ---- embedding: a scatter of the gradient, no weights needed (tied: plus the head's)
            eacc = tied_acc if tied else self._grad_acc("wide", embed.numel, zero=True)
            if prologue is None:
                v, hdim = spec.vocab_size, spec.hidden_size
                ew = eacc[: v * hdim].view(v, hdim)
                for ids, gy in zip(ids_mb, grads_out):
                    embed.defn.template.weight_grad_(ew, ids, gy)
                del ew
            else:
                for run, gy in zip(prologue_runs, grads_out):
                    kernels.accumulate_grad_(eacc, run.weight_grad(gy))
                del prologue_runs, block_args
                self.device_ledger.drop("block-context")
            del grads_out
            self.device_ledger.drop("grads-out")
            self._land(embed, eacc, norms, step=step, hyper=hyper)
            self._flush_landings()
            del eacc, tied_acc

            self._count_flops(n_rows * seq, len(ids_all))
            # ---- the step's verdict, in the one host read of the step: the loss, whether every
            # landed gradient is finite, the global norm; then the updates of every layer or of none
            finite_t = torch.stack([f.to(self.device) for f in self._finite]).all().double() if self._finite else None
            sq = self._sum_sq_norms(torch.stack(norms).double().sum()) if norms else None
            parts = [loss_t.double()] + [p for p in (finite_t, sq) if p is not None]
            read = self._host_read(torch.stack([p.reshape(()) for p in parts]))
            loss = read[0]
            finite = bool(read[1]) if finite_t is not None else True
            grad_norm = math.sqrt(read[-1]) if sq is not None else None
            if not math.isfinite(loss) or not finite or (self.grad_clip is not None and not math.isfinite(grad_norm)):
                # Known before any update: the step is skipped as a whole.
                for layer in layers:
                    self.landing.wait(layer.key)
                return StepResult(loss, grad_norm, True, len(layers) if not finite else 0, n_rows * seq)
            scale = 1.0 if self.grad_clip is None else min(1.0, self.grad_clip / (grad_norm + 1e-6))
            for layer in layers:  # embedding first: the next forward needs it first
                self.landing.update_from_buffer(
                    layer.key, layer.slab, hyper=hyper, step=step, grad_scale=scale, write_bf16=self.write_bf16,
                )
            return StepResult(loss, grad_norm, False, 0, n_rows * seq)
        except BaseException:
            # Leave the engine usable: no slot stays taken, no job stays unwaited.
            self._abort_landings()
            streamer.abandon()
            self.landing.wait_all()
            ckpts.clear()
            budget.clear()
            self._drop_step_holdings()
            raise

    # ------------------------------------------------------------------ state kept across steps
    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A batch tensor on the device; on CUDA through page-locked memory, so the copy is
        asynchronous (from pageable memory CUDA synchronises the stream first)."""
        if not self._cuda:
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _rope_inputs(self, position_ids, seq: int, micro_batch_size: int, lo: int, hi: int) -> list:
        """Per micro-batch (cos, sin, block keywords). Without packed documents and with a rotary
        whose tables depend on the length alone (not dynamic / longrope, whose state follows the
        batches seen), the tables of a length are computed once and kept (a few lengths)."""
        if position_ids is not None or self.rotary.rope.rope_type in ("dynamic", "longrope"):
            return micro_batch_inputs(self.rotary, position_ids, seq, micro_batch_size, lo, hi, self.dtype,
                                      self.device)
        hit = self._rope_cache.get(seq)
        if hit is None:
            hit = micro_batch_inputs(self.rotary, None, seq, micro_batch_size, 0, 1, self.dtype, self.device)[0]
            if len(self._rope_cache) >= 4:
                self._rope_cache.pop(next(iter(self._rope_cache)))
            self._rope_cache[seq] = hit
        return [hit] * (hi - lo)

    def _checkpoints(self, tokens: int) -> ActivationStore:
        offload = self._offload(tokens)
        store = self._ckpt_stores.get(offload)
        if store is None:  # one per placement, kept: its copy stream is made once
            store = self._ckpt_stores[offload] = ActivationStore(self.device, offload, self.device_ledger,
                                                                 self.host_ledger)
        return store

    def _next_ring(self) -> str:
        name = ("ring0", "ring1")[self._ring_turn]
        self._ring_turn ^= 1
        return name

    def _grad_acc(self, name: str, numel: int, *, zero: bool) -> torch.Tensor:
        """The first `numel` elements of the persistent fp32 gradient buffer `name`, ordered
        after the landing copy that last read it. Its content is stale unless `zero`: the
        first micro-batch overwrites it (`_accumulate(first=True)`); the embedding's scatter
        and a data-parallel rank without a micro-batch need it zeroed."""
        buf = self._grad_bufs[name]
        if numel > buf.numel():  # a slice would silently come back short
            raise RuntimeError(f"gradient buffer {name} holds {buf.numel()} elements, a layer needs {numel}")
        self.landing.before_reuse(buf)
        acc = buf[:numel]
        if zero:
            acc.zero_()
        return acc

    def _host_read(self, t: torch.Tensor) -> list:
        """The step's device -> host reads go through here (counted in `host_syncs`)."""
        self.host_syncs += 1
        return t.tolist()

    # ------------------------------------------------------------------ data-parallel hooks
    # A single process runs the defaults below; `engine.distributed.DataParallelEngine`
    # overrides them (which micro-batches are this rank's, the sums across ranks, the
    # reduction of each layer's gradient before it lands, the weight refresh after AdamW).

    def evaluate(self, input_ids: torch.Tensor, labels: torch.Tensor, micro_batch_size: int, *,
                 position_ids=None) -> tuple[float, int]:
        """Forward only, for evaluation: (sum of the per-token losses, label tokens) of a batch.
        Each layer's weights stream in once (after any queued update of that layer), the blocks
        run with autograd off and keep no checkpoints; nothing is updated. Every rank of a
        data-parallel run computes the whole batch (the same result everywhere)."""
        dev = self.device
        layers = self.model.layers
        embed, blocks, head = layers[0], layers[1:-1], layers[-1]
        tied = self.spec.tie_word_embeddings
        seq = input_ids.shape[1]
        if position_ids is not None:  # as in `step`: no target across a document boundary
            labels = labels.masked_fill(position_ids == 0, -100)
        shifted = shift_labels(labels)
        n_label_tokens = int((shifted != -100).sum())
        ids_mb = [t.to(dev) for t in input_ids.split(micro_batch_size)]
        lab_mb = [t.to(dev) for t in shifted.split(micro_batch_size)]
        rope = (micro_batch_inputs(self.rotary, position_ids, seq, micro_batch_size, 0, len(ids_mb), self.dtype, dev)
                if getattr(embed.defn.template, "prologue", None) is None else None)
        items = [(("fwd", layer.key), layer) for layer in layers]
        if tied:
            items.append((("head-weight", embed.key), embed))
        streamer = _Streamer(self, items)
        try:
            with torch.no_grad():
                slot = streamer.acquire(("fwd", embed.key))
                prologue = getattr(embed.defn.template, "prologue", None)
                if prologue is None:
                    hidden = [embed.defn.template.forward(embed.layout.views(slot), ids) for ids in ids_mb]
                    args = [((cos, sin), kw) for cos, sin, kw in rope]
                else:  # the hf path: the model's own forward up to the first layer
                    pos_mb = (position_ids.split(micro_batch_size) if position_ids is not None
                              else [None] * len(ids_mb))
                    runs = [prologue(slot, embed.layout, ids, position_ids=None if p is None else p.to(dev))
                            for ids, p in zip(ids_mb, pos_mb)]
                    hidden, args = [r.hidden for r in runs], [((r,), {}) for r in runs]
                streamer.release(("fwd", embed.key))
                for b in blocks:
                    slot = streamer.acquire(("fwd", b.key))
                    views = b.layout.views(slot)
                    hidden = [b.defn.template.forward(views, x, *a, **kw) for x, (a, kw) in zip(hidden, args)]
                    streamer.release(("fwd", b.key))
                slot = streamer.acquire(("fwd", head.key))
                head_weight = None
                if tied:
                    head_weight = embed.layout.views(streamer.acquire(("head-weight", embed.key)))["weight"]
                total = sum(float(head.defn.template.loss_sum(head.layout.views(slot), h, lab, head_weight,
                                                               chunk_size=self.loss_chunk_size))
                            for h, lab in zip(hidden, lab_mb))
        finally:
            streamer.abandon()
        return total, n_label_tokens

    def _micro_batch_share(self, n_micro_batches: int) -> tuple:
        return 0, n_micro_batches

    def _sum_across_ranks_(self, tensors: list) -> None:
        pass

    def _sum_sq_norms(self, sq: torch.Tensor) -> torch.Tensor:
        return sq

    def _before_forward_read(self, layer: HostLayer) -> None:
        # The previous step's AdamW must be done with this slab before it is read.
        self.landing.wait(layer.key)

    def _flush_landings(self) -> None:
        pass

    def _abort_landings(self) -> None:
        pass

    def _drop_step_holdings(self) -> None:
        for name in ("hidden", "grads-out", "block-context"):
            self.device_ledger.drop(name)

    def _land(self, layer: HostLayer, acc: torch.Tensor, norms: list, *, step, hyper) -> None:
        """Sends one layer's step gradient off the device (once per step) into the slab's
        gradient buffer, and notes on the device (no host read) whether it is finite. The
        updates are queued after the step's verdict: all layers or none."""
        self.layer_landings[layer.key] = self.layer_landings.get(layer.key, 0) + 1
        self._finite.append(kernels.all_finite_tensor(acc))
        if self.grad_clip is not None or self.track_grad_norm:
            norms.append(kernels.grad_sq_norm(acc))
        self.landing.land_to_buffer(layer.key, acc, layer.slab)

    def wait_all(self) -> None:
        self.landing.wait_all()

    def __del__(self):
        # Queued AdamW jobs hold raw pointers into the slabs: they must finish before the
        # slabs can be unmapped with this engine.
        landing = getattr(self, "landing", None)
        if landing is not None:
            try:
                landing.wait_all()
            except Exception:  # noqa: BLE001 - never raise from a finaliser
                pass

    @property
    def exposed_optimizer_seconds(self) -> float:
        return self.landing.wait_seconds
