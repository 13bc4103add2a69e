"""The hf path's layer templates: the model's own modules with parameters bound to views of
the streamed weight slot (`torch.func.functional_call`; nothing is copied into a module).

- `PrologueTemplate` ("embed"): runs the causal LM's own forward with capture shims in place
  of the decoder layers, so the embedding (and its scaling), position ids, rotary embeddings
  and the per-layer-type attention masks are the model's own; it stops after recording what
  every layer is handed. The run keeps a small autograd graph from the embedding slot to the
  first layer's input, so the backward needs no second stream of the embedding weights.
- `BlockTemplate` ("layers.i"): decoder layer i, called with the keywords the model's forward
  handed it (whatever their names in this transformers release), its input replaced by the
  engine's checkpoint.
- `EpilogueTemplate` ("head"): the causal LM's own forward again, with a replay shim returning
  the last block's output, so the final norm, head, soft-capping and any final scaling are
  the model's own; chunked over positions, each chunk's forward and backward done at once so
  only one chunk's logits exist at a time.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .names import DiskNames
from .structure import ShimRun, _canonical_names, _Stop, forward_kwargs, logits_of, shims_in_place, zero_stride

DEFAULT_LOSS_CHUNK_TOKENS = 1024


class _DeviceBuffers:
    """A module's buffers copied to the compute device once (again when one changed on the
    host, e.g. after an import)."""

    def __init__(self, named: dict):
        self.host = named
        self._cache: dict = {}

    def on(self, device: torch.device) -> dict:
        versions = tuple(b._version for b in self.host.values())
        hit = self._cache.get(device)
        if hit is None or hit[0] != versions:
            hit = (versions, {n: b.to(device) for n, b in self.host.items()})
            self._cache[device] = hit
        return hit[1]


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _tensor_bytes(objs) -> int:
    seen, total = set(), 0
    from torch.utils import _pytree as pytree

    for leaf in pytree.tree_leaves(objs):
        if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
            ptr = _storage_ptr(leaf)
            if ptr not in seen:
                seen.add(ptr)
                total += leaf.untyped_storage().nbytes()
    return total


class PrologueRun:
    """One micro-batch's prologue: the first layer's input (`hidden`, detached), what each
    layer is handed (`calls`), the graph back to the embedding slot for `weight_grad`, and the
    RNG states of the blocks' forward runs (replayed by their recompute)."""

    def __init__(self, hidden, calls, out, flat, nbytes):
        self.hidden = hidden
        self.calls = calls
        self._out = out
        self._flat = flat
        self.nbytes = nbytes
        self.rng: dict = {}

    def weight_grad(self, grad_hidden: torch.Tensor) -> torch.Tensor:
        """d loss / d (embedding slot), flat, given d loss / d (first layer's input); frees the graph."""
        out, flat = self._out, self._flat
        self._out = self._flat = None
        if out is None or not out.requires_grad:
            return torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
        (g,) = torch.autograd.grad(out, flat, grad_hidden.to(out.dtype), allow_unused=True)
        return torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device) if g is None else g


class _Shared:
    """What the three kinds of template share: the structure and the non-layer buffers."""

    def __init__(self, structure):
        self.s = structure
        model = structure.model
        prefix = structure.layers_path + "."
        canon = _canonical_names(model)
        self.nonlayer_shapes = {canon[id(p)]: tuple(p.shape) for _, p in model.named_parameters()
                                if not canon[id(p)].startswith(prefix)}
        # Parameters transformers does not train, outside the layers: host tensors, bound like buffers.
        self.frozen = {n: torch.zeros(shape) for n, shape in self.nonlayer_shapes.items() if n in structure.frozen}
        named = {n: b for n, b in model.named_buffers() if n in set(structure.nonlayer_buffers)}
        self.nonlayer_buffers = _DeviceBuffers({**named, **self.frozen})

    def call_model(self, bound: dict, device, run: ShimRun, input_ids, position_ids=None):
        s = self.s
        bufs = self.nonlayer_buffers.on(device)
        with shims_in_place(s.model, s.layers_path, run):
            return torch.func.functional_call(s.model, (bound, bufs), (),
                                              forward_kwargs(s.model, input_ids, position_ids),
                                              tie_weights=True, strict=False)


class PrologueTemplate:
    kind = "embedding"

    def __init__(self, shared: _Shared):
        self.shared = shared
        s = shared.s
        # The input embedding is "weight" in the slab layout (what a tied head reads).
        self.names = {"weight": s.embed_name}
        for n in s.prologue:
            if n != s.embed_name:
                self.names[n] = n
        self.shapes = {k: shared.nonlayer_shapes[v] for k, v in self.names.items()}
        self._disk = DiskNames(s.model, {v: self.shapes[k] for k, v in self.names.items()})

    def hf_tensors(self, index, views: dict) -> dict:
        return self._disk.tensors({self.names[k]: v for k, v in views.items()})

    def prologue(self, slot: torch.Tensor, layout, input_ids: torch.Tensor, position_ids=None) -> PrologueRun:
        """Runs the model's own forward up to its decoder layers on one micro-batch."""
        s = self.shared.s
        flat = slot.detach().requires_grad_()
        with torch.enable_grad():  # the engine's forward runs under no_grad
            views = layout.views(flat)
        bound = {self.names[k]: v for k, v in views.items()}
        slot_ptr = _storage_ptr(slot)
        saved = []

        def pack(t):
            # A saved tensor that aliases the slot would change under the next layer's copy.
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and _storage_ptr(t) == slot_ptr:
                t = t.detach().clone()
            saved.append(t)
            return t

        run = ShimRun(s.num_layers, "capture", returns=s.returns)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            try:
                self.shared.call_model(bound, slot.device, run, input_ids, position_ids)
            except _Stop:
                pass
        out = run.first_hidden
        nbytes = _tensor_bytes([c.args for c in run.calls] + [c.kwargs for c in run.calls]) + _tensor_bytes(
            [t for t in saved if isinstance(t, torch.Tensor) and _storage_ptr(t) != slot_ptr])
        return PrologueRun(out.detach(), run.calls, out, flat, nbytes)

    def forward(self, params: dict, input_ids: torch.Tensor) -> torch.Tensor:
        """The first layer's input (no graph kept)."""
        s = self.shared.s
        bound = {self.names[k]: v for k, v in params.items()}
        run = ShimRun(s.num_layers, "capture", returns=s.returns)
        with torch.no_grad():
            try:
                self.shared.call_model(bound, input_ids.device, run, input_ids)
            except _Stop:
                pass
        return run.first_hidden


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _rng_replayed(device: torch.device, state):
    before = _rng_state(device)
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
    try:
        yield
    finally:
        torch.set_rng_state(before[0])
        if before[1] is not None:
            torch.cuda.set_rng_state(before[1], device)


class BlockTemplate:
    kind = "decoder"

    def __init__(self, shared: _Shared, index: int):
        self.shared = shared
        self.index = index
        s = shared.s
        self.module = s.layer(index)
        self.prefix = f"{s.layers_path}.{index}."
        params = dict(self.module.named_parameters())
        self.shapes = {n: tuple(p.shape) for n, p in params.items() if self.prefix + n not in s.frozen}
        # Parameters transformers does not train: kept on the host, bound like buffers.
        self.init_constants = {n: torch.zeros(p.shape) for n, p in params.items() if self.prefix + n in s.frozen}
        bufs = dict(self.module.named_buffers())
        self.buffers = _DeviceBuffers({**bufs, **self.init_constants})
        self.constants = {n: b for n, b in bufs.items() if self.prefix + n in s.layer_buffers_persistent}
        self.constants.update(self.init_constants)
        self._disk = DiskNames(s.model, {self.prefix + n: shape for n, shape in self.shapes.items()},
                               {self.prefix + n: b for n, b in self.constants.items()})

    def hf_tensors(self, index, views: dict) -> dict:
        return self._disk.tensors({self.prefix + n: v for n, v in views.items()})

    def forward(self, params: dict, x: torch.Tensor, run: PrologueRun, router_stats=None) -> torch.Tensor:
        call = run.calls[self.index]
        args, kwargs = call.with_hidden(x)
        # An object the forward hands every layer to leave state in (a shared-KV store, empty
        # when captured) starts empty for each layer: a block runs on its own, in the forward
        # and in its recompute alike (models whose layers read each other's state are refused).
        for key in call.stores:
            kwargs[key].clear()
        bound = (params, self.buffers.on(x.device))
        if torch.is_grad_enabled() and self.index in run.rng:
            # The recompute: the same random numbers (dropout) as the forward run.
            with _rng_replayed(x.device, run.rng[self.index]):
                out = torch.func.functional_call(self.module, bound, args, kwargs, strict=False)
        else:
            run.rng[self.index] = _rng_state(x.device)
            out = torch.func.functional_call(self.module, bound, args, kwargs, strict=False)
        if not isinstance(out, torch.Tensor):
            out = out[0]
        return out


class _ChunkedEpilogue(torch.autograd.Function):
    """Sum of the token losses over position chunks; each chunk's forward and backward run
    inside the forward, so one chunk's logits exist at a time; backward scales the gradients."""

    @staticmethod
    def forward(ctx, template, hidden, labels, chunk_tokens, names, *params):
        rows, seq = hidden.shape[0], hidden.shape[1]
        step = max(1, chunk_tokens // max(rows, 1))
        need_h = ctx.needs_input_grad[1]
        g_hidden = torch.zeros_like(hidden) if need_h else None
        g_params = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for lo in range(0, seq, step):
            hi = min(seq, lo + step)
            h = hidden[:, lo:hi].detach().requires_grad_(need_h)
            leaves = [p.detach().requires_grad_() for p in params]
            lab = labels[:, lo:hi]
            with torch.enable_grad():
                loss = template.chunk_loss(dict(zip(names, leaves)), h, lab)
            wrt = ([h] if need_h else []) + leaves
            grads = torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad else [None] * len(wrt)
            if need_h:
                if grads[0] is not None:
                    g_hidden[:, lo:hi] = grads[0]
                grads = grads[1:]
            for acc, g in zip(g_params, grads):
                if g is not None:
                    acc.add_(g)
            total += loss.detach()
        ctx.save_for_backward(*([g_hidden] if need_h else []), *g_params)
        ctx.need_h = need_h
        ctx.dtypes = [p.dtype for p in params]
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        g_hidden = saved.pop(0) * grad_out if ctx.need_h else None
        g_params = [(g * grad_out).to(dt) for g, dt in zip(saved, ctx.dtypes)]
        return (None, g_hidden, None, None, None, *g_params)


class EpilogueTemplate:
    kind = "head"

    def __init__(self, shared: _Shared):
        self.shared = shared
        s = shared.s
        self.shapes = {n: shared.nonlayer_shapes[n] for n in s.epilogue}
        # Parameters the forward never uses or transformers does not train (kept, exported,
        # not trained): host tensors; the frozen ones are bound in every run of the model.
        self.init_constants = {n: torch.zeros(shared.nonlayer_shapes[n], dtype=torch.float32) for n in s.unused}
        self.init_constants.update(shared.frozen)
        self.constants = dict(self.init_constants)
        nonlayer_persistent = {n: b for n, b in s.model.named_buffers()
                               if n in set(s.nonlayer_buffers) and n in set(s.model.state_dict().keys())}
        self.constants.update(nonlayer_persistent)
        self._disk = DiskNames(s.model, dict(self.shapes), self.constants)

    def hf_tensors(self, index, views: dict) -> dict:
        return self._disk.tensors(dict(views))

    def chunk_loss(self, params: dict, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s = self.shared.s
        dev, dtype = hidden.device, hidden.dtype
        bound = dict(params)
        for n in s.prologue:
            if n not in bound:
                bound[n] = zero_stride(self.shared.nonlayer_shapes[n], dtype, dev)
        dummy = torch.zeros(hidden.shape[:2], dtype=torch.long, device=dev)
        run = ShimRun(s.num_layers, "replay", returns=s.returns, replay=hidden)
        logits = logits_of(self.shared.call_model(bound, dev, run, dummy))
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100, reduction="sum")

    def loss_sum(self, params: dict, hidden: torch.Tensor, labels: torch.Tensor, head_weight=None,
                 chunk_size=None) -> torch.Tensor:
        """Sum of this micro-batch's token losses; `labels` already shifted, -100 ignored."""
        names = list(params)
        tensors = [params[n] for n in names]
        if head_weight is not None:
            names.append(self.shared.s.embed_name)
            tensors.append(head_weight)
        chunk = chunk_size or DEFAULT_LOSS_CHUNK_TOKENS
        if not isinstance(chunk, int) or chunk <= 0 or math.isnan(chunk):
            chunk = DEFAULT_LOSS_CHUNK_TOKENS
        return _ChunkedEpilogue.apply(self, hidden, labels, chunk, names, *tensors)
