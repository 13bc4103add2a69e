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
from ..models import shift_labels
from .activations import ActivationStore
from .ledger import MemoryLedger, SavedActivations, tensor_bytes
from .pipeline import GradientLanding, WeightStream
from .state import HostLayer, HostModel


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    skipped: bool
    skipped_layer_updates: int
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
    def __init__(
        self,
        model: HostModel,
        device: torch.device,
        compute_dtype: torch.dtype,
        *,
        grad_clip: float | None,
        track_grad_norm: bool = True,
        n_slots: int = 2,
        landing_slots: int = 2,
        offload_checkpoints: bool | None = None,
        loss_chunk_size: int | None = None,
    ):
        if n_slots < 2:
            raise HorizonError(f"n_slots must be >= 2 (one layer computes while the next streams in), got {n_slots}")
        if landing_slots < 1:
            raise HorizonError(f"landing_slots must be >= 1, got {landing_slots}")
        self.model = model
        self.spec = model.spec
        self.device = device
        self.dtype = compute_dtype
        self.grad_clip = grad_clip
        self.track_grad_norm = track_grad_norm
        self.loss_chunk_size = loss_chunk_size
        self._cuda = device.type == "cuda"
        self.device_ledger = MemoryLedger()
        self.host_ledger = MemoryLedger()

        if self._cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self._cuda_base = torch.cuda.memory_allocated(device)

        max_numel = max(layer.numel for layer in model.layers)
        # One pipeline (three worker lanes) per engine, so its counters are this engine's.
        self.pipeline = _native.Pipeline()
        self.stream = WeightStream(n_slots, max_numel, device, compute_dtype, pipeline=self.pipeline)
        make_landing = getattr(model, "make_landing", None)  # the disk tier brings its own
        self.landing = (make_landing or GradientLanding)(landing_slots, max_numel, device, pipeline=self.pipeline)
        self.device_ledger.hold("weight-slots", self.stream.device_bytes)
        self.host_ledger.hold("slabs", model.host_bytes)
        self.host_ledger.hold("landing-slots", self.landing.host_bytes)

        if offload_checkpoints is None:
            offload_checkpoints = True if not self._cuda else None  # CUDA: decided per step by size
        self._offload_setting = offload_checkpoints
        self.layer_landings: dict = {}  # key -> landings in the last step (the once-per-step invariant)

    # ------------------------------------------------------------------ helpers
    def weight_source(self, layer: HostLayer) -> torch.Tensor:
        s = layer.slab
        return s.master if self.dtype == torch.float32 else s.weights_bf16

    @property
    def write_bf16(self) -> bool:
        return self.dtype != torch.float32

    def peak_device_bytes(self) -> int:
        if self._cuda:
            return max(0, torch.cuda.max_memory_allocated(self.device) - self._cuda_base)
        return self.device_ledger.peak

    def peak_host_bytes(self) -> int:
        return self.host_ledger.peak

    def _offload(self, tokens: int) -> bool:
        if self._offload_setting is not None:
            return bool(self._offload_setting)
        need = (self.spec.num_layers + 1) * tokens * self.spec.hidden_size * torch.empty((), dtype=self.dtype).element_size()
        free, _total = torch.cuda.mem_get_info(self.device)
        return need > free // 4

    def _hold_list(self, name, tensors) -> None:
        self.device_ledger.hold(name, tensor_bytes(tensors))

    # ------------------------------------------------------------------ the step
    def step(self, input_ids: torch.Tensor, labels: torch.Tensor, micro_batch_size: int, *, step: int,
             lr: float, betas, eps: float, weight_decay: float) -> StepResult:
        """One optimizer step on the whole batch (`input_ids`, `labels` [N, T] on the CPU,
        labels unshifted, HF convention). `step` is the 1-based AdamW step number."""
        dev = self.device
        spec = self.spec
        layers = self.model.layers
        embed, blocks, head = layers[0], layers[1:-1], layers[-1]
        tied = spec.tie_word_embeddings
        n_rows, seq = input_ids.shape

        shifted = shift_labels(labels)
        n_label_tokens = int((shifted != -100).sum())
        if n_label_tokens == 0:
            raise HorizonError("the batch has no label tokens (all labels are -100 after the shift)")
        # Data parallel: this rank's contiguous share of the step's micro-batches (all of
        # them in a single process); the loss normaliser stays the whole batch's count.
        ids_all, lab_all = input_ids.split(micro_batch_size), shifted.split(micro_batch_size)
        mb_lo, mb_hi = self._micro_batch_share(len(ids_all))
        ids_mb = [t.to(dev, non_blocking=True) for t in ids_all[mb_lo:mb_hi]]
        lab_mb = [t.to(dev, non_blocking=True) for t in lab_all[mb_lo:mb_hi]]
        inv_tokens = 1.0 / n_label_tokens
        cos, sin = kernels.rope_cos_sin(torch.arange(seq), spec.head_dim, spec.rope_theta, dtype=self.dtype, device=dev)
        ckpts = ActivationStore(dev, self._offload(n_rows * seq), self.device_ledger, self.host_ledger)
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
        self.layer_landings = {}

        try:
            # ---- forward, layer-major, autograd off
            with torch.no_grad():
                slot = streamer.acquire(("fwd", embed.key))
                views = embed.layout.views(slot)
                hidden = [embed.defn.template.forward(views, ids) for ids in ids_mb]
                streamer.release(("fwd", embed.key))
                self._hold_list("hidden", hidden)
                for b in blocks:
                    key = ("fwd", b.key)
                    slot = streamer.acquire(key)
                    views = b.layout.views(slot)
                    out = []
                    moe_aux = aux_coef and b.defn.template.kind == "moe"
                    for x in hidden:
                        stats = [] if moe_aux else None
                        y = b.defn.template.forward(views, x, cos, sin, router_stats=stats)
                        if stats:
                            route_probs += stats[0][0]
                            route_counts += stats[0][1]
                        out.append(y)
                    streamer.release(key)
                    ckpts.put(b.key, hidden)
                    self.device_ledger.drop("hidden")
                    hidden = out
                    self._hold_list("hidden", hidden)

            # ---- head + loss, autograd on for the head only
            slot = streamer.acquire(("fwd", head.key))
            head_flat = slot.detach().requires_grad_()
            head_views = head.layout.views(head_flat)
            head_weight = None
            tied_flat = None
            if tied:
                tslot = streamer.acquire(("head-weight", embed.key))
                tied_flat = tslot.detach().requires_grad_()
                head_weight = embed.layout.views(tied_flat)["weight"]
            head_acc = torch.zeros(head.numel, dtype=torch.float32, device=dev)
            tied_acc = torch.zeros(embed.numel, dtype=torch.float32, device=dev) if tied else None
            self.device_ledger.hold("head-acc", tensor_bytes([head_acc, tied_acc]))
            grads_out = []
            loss_parts = []
            wrt = (head_flat,) if not tied else (head_flat, tied_flat)
            for h, lab in zip(hidden, lab_mb):
                h = h.detach().requires_grad_()
                saved = SavedActivations([slot.untyped_storage().data_ptr(), h.untyped_storage().data_ptr()])
                with torch.enable_grad(), saved.hooks():
                    loss_sum = head.defn.template.loss_sum(head_views, h, lab, head_weight, chunk_size=self.loss_chunk_size)
                    scaled = loss_sum * inv_tokens
                self.device_ledger.transient(saved.nbytes)
                g = torch.autograd.grad(scaled, (h,) + wrt)
                grads_out.append(g[0])
                kernels.accumulate_grad_(head_acc, g[1])
                if tied:
                    kernels.accumulate_grad_(tied_acc, g[2])
                loss_parts.append(loss_sum.detach())
                self._hold_list("grads-out", grads_out)
            g = scaled = loss_sum = None  # (a data-parallel rank may have had no micro-batch)
            streamer.release(("fwd", head.key))
            if tied:
                streamer.release(("head-weight", embed.key))
            self.device_ledger.drop("hidden")
            del hidden

            # One host read per step: the loss decides whether the step happens at all.
            loss_t = torch.stack(loss_parts).sum() * inv_tokens if loss_parts else torch.zeros((), device=dev)
            # Data parallel: the ranks' loss shares and router statistics add up here (a
            # no-op in a single process), so every rank takes the same decision below.
            self._sum_across_ranks_([loss_t] + ([route_counts, route_probs] if aux_coef else []))
            if aux_coef:
                loss_t = loss_t + aux_scale * (route_counts * route_probs).sum()
            loss = float(loss_t)
            if not math.isfinite(loss):
                streamer.abandon()
                ckpts.clear()
                self._drop_step_holdings()
                return StepResult(loss, None, True, 0, n_rows * seq)

            norms = []
            skipped_layers = self._land(head, head_acc, norms, step=step, lr=lr, betas=betas, eps=eps,
                                        weight_decay=weight_decay)
            del head_acc
            self.device_ledger.hold("head-acc", tensor_bytes(tied_acc))

            # ---- backward, reverse layer-major: recompute each block from its checkpoint
            for i in range(len(blocks) - 1, -1, -1):
                b = blocks[i]
                key = ("bwd", b.key)
                if i > 0:
                    ckpts.prefetch(blocks[i - 1].key)
                xs = ckpts.take(b.key)
                slot = streamer.acquire(key)
                flat = slot.detach().requires_grad_()
                views = b.layout.views(flat)
                acc = torch.zeros(b.numel, dtype=torch.float32, device=dev)
                self.device_ledger.hold("layer-acc", tensor_bytes(acc))
                new_grads = []
                moe_aux = aux_coef and b.defn.template.kind == "moe"
                for x, gy in zip(xs, grads_out):
                    x = x.detach().requires_grad_()
                    saved = SavedActivations([slot.untyped_storage().data_ptr(), x.untyped_storage().data_ptr()])
                    stats = [] if moe_aux else None
                    with torch.enable_grad(), saved.hooks():
                        y = b.defn.template.forward(views, x, cos, sin, router_stats=stats)
                        outs, grads = (y,), (gy,)
                        if stats:
                            outs += (aux_scale * (stats[0][0] * route_counts).sum(),)
                            grads += (None,)
                    self.device_ledger.transient(saved.nbytes + tensor_bytes(y) + tensor_bytes(new_grads))
                    gx, gflat = torch.autograd.grad(outs, (x, flat), grads)
                    del y, outs
                    kernels.accumulate_grad_(acc, gflat)
                    new_grads.append(gx)
                    del gflat
                streamer.release(key)
                ckpts.release(b.key)
                del xs
                grads_out = new_grads
                self._hold_list("grads-out", grads_out)
                skipped_layers += self._land(b, acc, norms, step=step, lr=lr, betas=betas, eps=eps,
                                             weight_decay=weight_decay)
                self.device_ledger.drop("layer-acc")
                del acc

            # ---- embedding: a scatter of the gradient, no weights needed (tied: plus the head's)
            eacc = tied_acc if tied else torch.zeros(embed.numel, dtype=torch.float32, device=dev)
            self.device_ledger.hold("layer-acc", tensor_bytes(eacc))
            v, hdim = spec.vocab_size, spec.hidden_size
            ew = eacc[: v * hdim].view(v, hdim)
            for ids, gy in zip(ids_mb, grads_out):
                embed.defn.template.weight_grad_(ew, ids, gy)
            del grads_out
            self.device_ledger.drop("grads-out")
            skipped_layers += self._land(embed, eacc, norms, step=step, lr=lr, betas=betas, eps=eps,
                                         weight_decay=weight_decay)
            self._flush_landings()
            del eacc, tied_acc
            self.device_ledger.drop("layer-acc")
            self.device_ledger.drop("head-acc")

            # ---- the global norm (one host read) and, with clipping, the updates
            grad_norm = None
            if norms:
                grad_norm = math.sqrt(float(self._sum_sq_norms(torch.stack(norms).double().sum())))
            if self.grad_clip is not None:
                if not math.isfinite(grad_norm):
                    # Known before any update: the step is skipped as a whole.
                    for layer in layers:
                        self.landing.wait(layer.key)
                    return StepResult(loss, grad_norm, True, 0, n_rows * seq)
                scale = min(1.0, self.grad_clip / (grad_norm + 1e-6))
                for layer in layers:  # embedding first: the next forward needs it first
                    self.landing.update_from_buffer(
                        layer.key, layer.slab, step=step, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        grad_scale=scale, write_bf16=self.write_bf16,
                    )
            return StepResult(loss, grad_norm, False, skipped_layers, n_rows * seq)
        except BaseException:
            # Leave the engine usable: no slot stays taken, no job stays unwaited.
            self._abort_landings()
            streamer.abandon()
            self.landing.wait_all()
            ckpts.clear()
            self._drop_step_holdings()
            raise

    # ------------------------------------------------------------------ data-parallel hooks
    # A single process runs the defaults below; `engine.distributed.DataParallelEngine`
    # overrides them (which micro-batches are this rank's, the sums across ranks, the
    # reduction of each layer's gradient before it lands, the weight refresh after AdamW).

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
        for name in ("hidden", "grads-out", "head-acc", "layer-acc"):
            self.device_ledger.drop(name)

    def _land(self, layer: HostLayer, acc: torch.Tensor, norms: list, *, step, lr, betas, eps, weight_decay) -> int:
        """Sends one layer's step gradient off the device (once per step). Without clipping,
        the Rust worker checks the landed gradient and skips a non-finite layer's update
        itself (counted in `landing.skipped_updates`), so the device never waits for a host
        read here. Returns the number of updates known skipped now (always 0)."""
        self.layer_landings[layer.key] = self.layer_landings.get(layer.key, 0) + 1
        if self.grad_clip is not None or self.track_grad_norm:
            norms.append(kernels.grad_sq_norm(acc))
        if self.grad_clip is not None:
            self.landing.land_to_buffer(layer.key, acc, layer.slab)
            return 0
        self.landing.land_and_update(
            layer.key, acc, layer.slab, step=step, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            write_bf16=self.write_bf16, skip_nonfinite=True,
        )
        return 0

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
