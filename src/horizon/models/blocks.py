"""Layer templates of the Llama-family decoder: embedding, decoder block, final norm + head.

A template owns no parameters. Its `shapes` table (HF tensor names relative to the layer's
prefix) defines the layer's slab layout, and its forward takes `params`, a dict of views into
a flat buffer (the streamed weight slot), so binding a layer is free and nothing is copied
into the template. The same template serves every layer of its kind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from ..kernels.attention import causal_attention
from ..kernels.moe import flash_moe
from .positions import attention_mask
from .spec import ModelSpec


class EmbeddingTemplate:
    """Token embedding. Its gradient is a scatter of the output gradient, so its backward
    needs the token ids only, never the weights."""

    kind = "embedding"

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.shapes = {"weight": (spec.vocab_size, spec.hidden_size)}

    @staticmethod
    def hf_name(name: str) -> str:
        return f"model.embed_tokens.{name}"

    def hf_tensors(self, index, views: dict) -> dict:
        return {self.hf_name(n): v for n, v in views.items()}

    def forward(self, params: dict, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, params["weight"])

    @staticmethod
    def weight_grad_(acc: torch.Tensor, input_ids: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """acc [V, H] (fp32) += d loss / d weight for this micro-batch. On CUDA a sorted segment
        sum (`sorted_segment_sum_`: the same bits every run); on the CPU `index_add_` (which
        adds in token order there)."""
        rows = input_ids.reshape(-1)
        values = grad_out.reshape(rows.numel(), -1).to(acc.dtype)
        if acc.is_cuda:
            return sorted_segment_sum_(acc, rows, values)
        return acc.index_add_(0, rows, values)


def sorted_segment_sum_(acc: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """acc[r] += sum of values[i] over the i with rows[i] == r, deterministically and without a
    host synchronisation: the pairs are sorted by row (stably: token order within a row), each
    row's values are summed as a binary tree in that order (ceil(log2 n) rounds over all n
    values, the same rounds whatever the data), and one index_add_ brings each row's sum in.
    In that index_add_ every other value of a row is an exact zero, so the float atomics that
    make index_add_ nondeterministic on CUDA have only one order-independent result."""
    n = rows.numel()
    if n == 0:
        return acc
    order = torch.argsort(rows, stable=True)
    r = rows[order]
    x = values[order]
    idx = torch.arange(n, device=rows.device)
    boundary = r[1:] != r[:-1]
    first = torch.cat([boundary.new_ones(1), boundary])  # a row's first sorted position
    last = torch.cat([boundary, boundary.new_ones(1)])  # ... and its last
    start = torch.cummax(torch.where(first, idx, 0), 0).values
    end = torch.cummin(torch.where(last, idx, n - 1).flip(0), 0).values.flip(0)
    pos = idx - start  # place inside the row's run of the sorted values
    step = 1
    while step < n:
        # Positions 0, 2s, 4s, ... of a run add the partial sum s places on, if it is in the run.
        take = (pos[:-step] % (2 * step) == 0) & (idx[:-step] + step <= end[:-step])
        x[:-step] += torch.where(take.unsqueeze(1), x[step:], torch.zeros((), dtype=x.dtype, device=x.device))
        step *= 2
    sums = torch.where(first.unsqueeze(1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return acc.index_add_(0, r, sums)


def _attention_shapes(spec: ModelSpec) -> dict:
    h, d = spec.hidden_size, spec.head_dim
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    shapes = {"input_layernorm.weight": (h,)}
    for proj, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        shapes[f"self_attn.{proj}.weight"] = (out, h)
        if spec.qkv_bias:
            shapes[f"self_attn.{proj}.bias"] = (out,)
    shapes["self_attn.o_proj.weight"] = (h, q)
    if spec.o_bias:
        shapes["self_attn.o_proj.bias"] = (h,)
    if spec.qk_norm:
        shapes["self_attn.q_norm.weight"] = (d,)
        shapes["self_attn.k_norm.weight"] = (d,)
    shapes["post_attention_layernorm.weight"] = (h,)
    return shapes


def _attention_residual(spec: ModelSpec, params: dict, x, cos, sin, window=None, doc_ids=None):
    """x + Attn(RMSNorm(x)): grouped-query, causal, through SDPA; RoPE in HF's rotate-half
    layout (cos/sin [1 or B, T, D], already multiplied by the rope type's attention
    scaling); optional per-head q/k RMSNorm before RoPE (Qwen3) and projection biases. With a
    sliding `window` and/or packed documents (`doc_ids` [B, T], see `models.positions`) the
    attention takes an explicit boolean mask."""
    p = params.get
    b, t, _ = x.shape
    eps = spec.rms_norm_eps
    h = kernels.rms_norm(x, params["input_layernorm.weight"], eps)
    q = F.linear(h, params["self_attn.q_proj.weight"], p("self_attn.q_proj.bias"))
    k = F.linear(h, params["self_attn.k_proj.weight"], p("self_attn.k_proj.bias"))
    v = F.linear(h, params["self_attn.v_proj.weight"], p("self_attn.v_proj.bias"))
    q = q.view(b, t, spec.num_heads, spec.head_dim)
    k = k.view(b, t, spec.num_kv_heads, spec.head_dim)
    v = v.view(b, t, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
    if spec.qk_norm:
        q = kernels.rms_norm(q, params["self_attn.q_norm.weight"], eps)
        k = kernels.rms_norm(k, params["self_attn.k_norm.weight"], eps)
    q, k = kernels.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    # a deterministic backward on CUDA (kernels/attention.py); windows and packed documents as a mask
    attn = causal_attention(q, k, v, attention_mask(t, window, doc_ids, x.device))
    attn = attn.transpose(1, 2).reshape(b, t, spec.num_heads * spec.head_dim)
    return x + F.linear(attn, params["self_attn.o_proj.weight"], p("self_attn.o_proj.bias"))


class DecoderBlockTemplate:
    """Pre-norm decoder block: h = x + Attn(RMSNorm(x)), then h + SwiGLU-MLP(RMSNorm(h)).
    `window`: the sliding window of the layers this template serves (None: full attention)."""

    kind = "decoder"

    def __init__(self, spec: ModelSpec, window: int | None = None):
        self.spec = spec
        self.window = window
        h, i = spec.hidden_size, spec.intermediate_size
        shapes = _attention_shapes(spec)
        for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            shapes[f"mlp.{proj}.weight"] = shape
            if spec.mlp_bias:
                shapes[f"mlp.{proj}.bias"] = (shape[0],)
        self.shapes = shapes

    @staticmethod
    def hf_name(index: int, name: str) -> str:
        return f"model.layers.{index}.{name}"

    def hf_tensors(self, index: int, views: dict) -> dict:
        """HF checkpoint name -> view, for import and export."""
        return {self.hf_name(index, n): v for n, v in views.items()}

    def forward(self, params: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                router_stats=None, doc_ids=None) -> torch.Tensor:
        """`doc_ids` [B, T]: packed documents (see `models.positions`); None: one per row."""
        p = params.get
        x = _attention_residual(self.spec, params, x, cos, sin, self.window, doc_ids)
        h = kernels.rms_norm(x, params["post_attention_layernorm.weight"], self.spec.rms_norm_eps)
        gate = F.linear(h, params["mlp.gate_proj.weight"], p("mlp.gate_proj.bias"))
        up = F.linear(h, params["mlp.up_proj.weight"], p("mlp.up_proj.bias"))
        return x + F.linear(kernels.swiglu(gate, up), params["mlp.down_proj.weight"], p("mlp.down_proj.bias"))


class MoEBlockTemplate:
    """Decoder block whose MLP is a mixture of SwiGLU experts run by `horizon.moe.flash_moe`
    (Mixtral, Qwen3-MoE). The experts live in the slab as three stacked tensors (w1 = gate,
    w3 = up: [E, I, H]; w2 = down: [E, H, I]); each HF per-expert tensor is a view of one row."""

    kind = "moe"

    def __init__(self, spec: ModelSpec, window: int | None = None):
        self.spec = spec
        self.window = window
        h, e, i = spec.hidden_size, spec.num_experts, spec.moe_intermediate_size
        self.shapes = _attention_shapes(spec)
        self.shapes.update({"router": (e, h), "w1": (e, i, h), "w3": (e, i, h), "w2": (e, h, i)})
        if spec.model_type == "mixtral":
            self._prefix = "block_sparse_moe"
            self._names = {"w1": "w1", "w3": "w3", "w2": "w2"}
        else:
            self._prefix = "mlp"
            self._names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

    @staticmethod
    def hf_name(index: int, name: str) -> str:
        return f"model.layers.{index}.{name}"

    def hf_tensors(self, index: int, views: dict) -> dict:
        out = {}
        for n, v in views.items():
            if n == "router":
                out[f"model.layers.{index}.{self._prefix}.gate.weight"] = v
            elif n in self._names:
                for e in range(v.shape[0]):
                    out[f"model.layers.{index}.{self._prefix}.experts.{e}.{self._names[n]}.weight"] = v[e]
            else:
                out[self.hf_name(index, n)] = v
        return out

    def forward(self, params: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                router_stats=None, doc_ids=None) -> torch.Tensor:
        """With `router_stats` (a list), appends (sum over tokens of the router probabilities
        [E] fp32, differentiable; tokens routed to each expert [E]) for the load-balancing loss.
        `doc_ids`: as DecoderBlockTemplate.forward."""
        s = self.spec
        x = _attention_residual(s, params, x, cos, sin, self.window, doc_ids)
        h = kernels.rms_norm(x, params["post_attention_layernorm.weight"], s.rms_norm_eps)
        flat = h.reshape(-1, h.shape[-1])
        # The statistics come from flash_moe's own routing: a second top-k here could break
        # ties differently from the one that dispatched the tokens.
        out = flash_moe(flat, params["router"], params["w1"], params["w3"], params["w2"],
                        top_k=s.num_experts_per_tok, renormalize=s.renormalize_topk,
                        router_stats=router_stats is not None)
        if router_stats is not None:
            router_stats.append(out[2])
        return x + out[0].view_as(x)


class HeadTemplate:
    """Final RMSNorm + LM head + cross-entropy, fused and chunked over the vocabulary so the
    logits are never materialised. With tied embeddings the head weight is the embedding
    slab's and this layer holds only the norm."""

    kind = "head"

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.shapes = {"norm.weight": (spec.hidden_size,)}
        if not spec.tie_word_embeddings:
            self.shapes["lm_head.weight"] = (spec.vocab_size, spec.hidden_size)

    @staticmethod
    def hf_name(name: str) -> str:
        return name if name.startswith("lm_head.") else f"model.{name}"

    def hf_tensors(self, index, views: dict) -> dict:
        return {self.hf_name(n): v for n, v in views.items()}

    def loss_sum(self, params: dict, hidden: torch.Tensor, labels: torch.Tensor, head_weight=None,
                 chunk_size=None) -> torch.Tensor:
        """Sum of the token losses of this micro-batch; `labels` are already shifted (HF
        convention: position t predicts labels[t]) with -100 ignored."""
        w = head_weight if head_weight is not None else params["lm_head.weight"]
        h = kernels.rms_norm(hidden, params["norm.weight"], self.spec.rms_norm_eps)
        return kernels.fused_linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), ignore_index=-100,
            chunk_size=chunk_size, reduction="sum",
        )


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF causal-LM convention: position t is trained to predict labels[t + 1]; the last
    position predicts nothing."""
    return F.pad(labels, (0, 1), value=-100)[..., 1:]
