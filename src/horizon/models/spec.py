"""The model description Horizon trains from: a validated reading of a Hugging Face
`config.json` for the decoder-only families of the native path: Llama, Mistral, Qwen2, Qwen3,
Mixtral and Qwen3-MoE.

Defaults are transformers' own: the dict is resolved through the family's transformers config
class (`CONFIG_MAPPING[model_type].from_dict`), so a missing key takes the value transformers
would train with (Mixtral's rope_theta 1e6 and rms_norm_eps 1e-5, Qwen3's head_dim 128,
Mistral's sliding_window 4096, Qwen2/Qwen3 `layer_types` from use_sliding_window and
max_window_layers, a pre-5 `rope_scaling` / top-level `rope_theta` moved into
`rope_parameters`, ...), and the spec is read from that resolved dict.

Every key of these six config classes is implemented, refused, or (where transformers'
modeling code does not read it either) not used:

- implemented: vocab_size, hidden_size, intermediate_size, num_hidden_layers,
  num_attention_heads, num_key_value_heads, head_dim, hidden_act ('silu' / 'swish'),
  rms_norm_eps, initializer_range, tie_word_embeddings, max_position_embeddings (rotary),
  rope_parameters / rope_scaling / rope_theta (types default, linear, dynamic, yarn, longrope,
  llama3: `horizon.kernels.rope`), attention_bias (Llama, Qwen3, Qwen3-MoE: q/k/v/o biases),
  mlp_bias (Llama), Qwen2's fixed q/k/v biases, Qwen3's q/k norm, sliding_window (Mistral,
  Mixtral: every layer; Qwen3-MoE: every layer when use_sliding_window), use_sliding_window +
  max_window_layers / layer_types (Qwen2, Qwen3: per layer), and the MoE keys
  (num_local_experts / num_experts, num_experts_per_tok, moe_intermediate_size,
  decoder_sparse_step, mlp_only_layers, norm_topk_prob, output_router_logits,
  router_aux_loss_coef); pad_token_id is read into `pad_token_id` (transformers'
  nn.Embedding padding_idx: a zero row at init that never gets a gradient), which the
  embedding's init and gradient apply.
- refused with a one-line HorizonError: attention_dropout other than 0 (dropout on the
  attention probabilities is not implemented), any other hidden_act, partial_rotary_factor
  other than 1 (these families rotate the whole head), rope types other than the six above
  (e.g. 'proportional', mrope), longrope factor lists whose length is not head_dim / 2,
  router_jitter_noise other than 0 (Mixtral), a `layer_types` entry other than
  full_attention / sliding_attention or a sliding layer without a sliding_window (Qwen2/3),
  a pad_token_id outside the embedding (transformers cannot build that model either).
- not used, as transformers' modeling does not use them: use_cache, bos/eos_token_id,
  pretraining_tp (Llama; transformers 5 ignores it and it never changed the math), and keys a
  family's modeling does not read (layer_types on Mistral / Mixtral / Qwen3-MoE, whose
  windows are all-or-none; sliding_window on Llama)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from ..errors import HorizonError
from ..kernels.rope import RopeSpec

# architecture -> the HF model_type it comes with; also the set we accept.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_BY_MODEL_TYPE = {v: k for k, v in ARCHITECTURES.items()}


def _positive_int(cfg: dict, key: str, default=None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise HorizonError(f"config.json: {key!r} must be an integer >= 1, got {value!r}")
    return value


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def resolve_hf_config(cfg: dict, model_type: str) -> dict:
    """`cfg` with every missing key filled as transformers' config class for `model_type`
    fills it (the class's defaults and its derived values), as a plain dict."""
    try:
        from transformers import CONFIG_MAPPING
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise HorizonError(f"reading a model config needs transformers>=5 (pip install 'transformers>=5,<6'): {e}") from e
    config_class = CONFIG_MAPPING[model_type]
    raw = copy.deepcopy(cfg)  # transformers standardises nested dicts in place
    for key in ("architectures", "model_type", "transformers_version"):
        raw.pop(key, None)
    # transformers' own warnings (e.g. an unknown rope_type) would add lines to our one-line
    # refusals: what we refuse, we say ourselves.
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        resolved = config_class.from_dict(raw)
    except Exception as e:  # noqa: BLE001 - transformers' validators raise many types
        raise HorizonError(f"config.json: transformers' {config_class.__name__} rejects it: {_one_line(e)}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    return resolved.to_dict()


def _moe_fields(cfg: dict, model_type: str) -> dict:
    if model_type not in ("mixtral", "qwen3_moe"):
        return {}
    if model_type == "mixtral":
        experts = _positive_int(cfg, "num_local_experts")
        inter = _positive_int(cfg, "intermediate_size")
        layers = tuple(range(_positive_int(cfg, "num_hidden_layers")))
        renorm = True
        jitter = cfg.get("router_jitter_noise") or 0.0
        if jitter:
            raise HorizonError(f"config.json: router_jitter_noise {jitter!r} not supported (only 0)")
    else:
        # transformers 5 writes num_local_experts (num_experts is its alias); older files num_experts.
        key = "num_local_experts" if cfg.get("num_local_experts") is not None else "num_experts"
        experts = _positive_int(cfg, key)
        inter = _positive_int(cfg, "moe_intermediate_size")
        step = _positive_int(cfg, "decoder_sparse_step", 1)
        dense = set(cfg.get("mlp_only_layers") or [])
        n = _positive_int(cfg, "num_hidden_layers")
        layers = tuple(i for i in range(n) if i not in dense and (i + 1) % step == 0)
        renorm = bool(cfg.get("norm_topk_prob", False))
    top_k = _positive_int(cfg, "num_experts_per_tok")
    if top_k > experts:
        raise HorizonError(f"config.json: num_experts_per_tok ({top_k}) exceeds the number of experts ({experts})")
    coef = cfg.get("router_aux_loss_coef", 0.001) if cfg.get("output_router_logits") else 0.0
    if not isinstance(coef, (int, float)) or coef < 0:
        raise HorizonError(f"config.json: router_aux_loss_coef must be >= 0, got {coef!r}")
    return dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=inter,
                moe_layers=layers, renormalize_topk=renorm, router_aux_loss_coef=float(coef))


@dataclass(frozen=True)
class ModelSpec:
    """Everything the templates need to know about one model; no weights."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    initializer_range: float
    # The window of the sliding-attention layers (None when no layer slides); which layers
    # slide: `layer_windows`.
    sliding_window: int | None
    # Mixture of experts (num_experts == 0: dense). moe_layers: the block indices with an
    # MoE MLP; the others use the dense SwiGLU MLP of `intermediate_size`.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_layers: tuple = ()
    renormalize_topk: bool = True
    # The HF load-balancing loss joins the LM loss only when output_router_logits is set.
    router_aux_loss_coef: float = 0.0
    config: dict = field(repr=False, compare=False, default_factory=dict)
    # Per decoder block: its sliding window (a query attends to itself and the window - 1
    # tokens before it, transformers' semantics) or None (full causal attention). Empty
    # means no block slides.
    layer_windows: tuple = ()
    # The rotary embedding (type and parameters); None: the default RoPE of rope_theta.
    rope: RopeSpec | None = None
    max_position_embeddings: int | None = None
    # transformers' nn.Embedding padding_idx (pad_token_id, a negative id counted from the
    # end as torch does): HF zeroes that row at init and never gives it a gradient. Read and
    # validated here; the embedding's init and gradient are where it applies.
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.rope is None:
            object.__setattr__(self, "rope", RopeSpec("default", float(self.rope_theta), self.head_dim,
                                                      self.max_position_embeddings or 0))
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (self.sliding_window,) * self.num_layers)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelSpec":
        if not isinstance(cfg, dict):
            raise HorizonError(f"config must be a dict (the content of config.json), got {type(cfg).__name__}")
        archs = cfg.get("architectures") or []
        if archs:
            if len(archs) != 1 or archs[0] not in ARCHITECTURES:
                raise HorizonError(
                    f"config.json: unsupported architecture {archs[0] if len(archs) == 1 else archs!r} "
                    f"(architectures supported: {', '.join(sorted(ARCHITECTURES))})"
                )
            arch = archs[0]
        else:
            model_type = cfg.get("model_type")
            if model_type not in _BY_MODEL_TYPE:
                raise HorizonError(
                    f"config.json: model_type {model_type!r} not supported; supported: {sorted(_BY_MODEL_TYPE)}"
                )
            arch = _BY_MODEL_TYPE[model_type]
        model_type = ARCHITECTURES[arch]
        # Our own checks of the keys given come first (their messages name the key), then
        # transformers fills in the rest.
        for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size"):
            if key in cfg:
                _positive_int(cfg, key)
        res = resolve_hf_config(cfg, model_type)

        hidden = _positive_int(res, "hidden_size")
        heads = _positive_int(res, "num_attention_heads")
        kv_heads = _positive_int(res, "num_key_value_heads") if res.get("num_key_value_heads") is not None else heads
        if heads % kv_heads:
            raise HorizonError(
                f"config.json: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
            )
        head_dim = res.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise HorizonError(f"config.json: hidden_size ({hidden}) not divisible by num_attention_heads ({heads})")
            head_dim = hidden // heads
        head_dim = _positive_int({"head_dim": head_dim}, "head_dim")
        if head_dim % 2:
            raise HorizonError(f"config.json: head_dim must be even for rotary embeddings, got {head_dim}")
        n_layers = _positive_int(res, "num_hidden_layers")

        act = res.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise HorizonError(f"config.json: hidden_act {act!r} not supported (only 'silu' / SwiGLU)")

        dropout = res.get("attention_dropout") or 0.0
        if dropout != 0:
            raise HorizonError(
                f"config.json: attention_dropout {dropout!r} not supported (dropout on the attention "
                "probabilities is not implemented; set it to 0.0)"
            )

        max_pos = _positive_int(res, "max_position_embeddings")
        rope_params = res.get("rope_parameters") or {}
        if not isinstance(rope_params, dict):
            raise HorizonError(f"config.json: rope_parameters must be a dict, got {rope_params!r}")
        rope_params = dict(rope_params)
        if rope_params.get("rope_theta") is None and res.get("rope_theta") is not None:
            rope_params["rope_theta"] = res["rope_theta"]
        rope = RopeSpec.from_parameters(rope_params, head_dim=head_dim, max_position_embeddings=max_pos)

        eps = res.get("rms_norm_eps", 1e-6)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
            raise HorizonError(f"config.json: rms_norm_eps must be positive, got {eps!r}")

        moe = _moe_fields(res, model_type)

        # The biases each family's transformers modeling creates.
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        elif model_type in ("llama", "qwen3", "qwen3_moe"):
            qkv_bias = o_bias = bool(res.get("attention_bias", False))
        else:  # mistral, mixtral: none
            qkv_bias = o_bias = False
        mlp_bias = bool(res.get("mlp_bias", False)) if model_type == "llama" else False

        windows = _layer_windows(res, model_type, n_layers)
        window = next((w for w in windows if w is not None), None)

        vocab = _positive_int(res, "vocab_size")
        pad = res.get("pad_token_id")
        if pad is not None:
            if isinstance(pad, bool) or not isinstance(pad, int) or not -vocab <= pad < vocab:
                raise HorizonError(f"config.json: pad_token_id must be an integer in [-{vocab}, {vocab}) "
                                   f"(a row of the embedding), got {pad!r}")
            pad = pad % vocab

        init_range = res.get("initializer_range", 0.02)
        if isinstance(init_range, bool) or not isinstance(init_range, (int, float)) or init_range < 0:
            raise HorizonError(f"config.json: initializer_range must be >= 0, got {init_range!r}")

        return cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=_positive_int(res, "intermediate_size"),
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(eps),
            rope_theta=rope.theta,
            tie_word_embeddings=bool(res.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            initializer_range=float(init_range),
            sliding_window=window,
            config=dict(cfg),
            layer_windows=windows,
            rope=rope,
            max_position_embeddings=max_pos,
            pad_token_id=pad,
            **moe,
        )

    @property
    def max_positions(self) -> int:
        """The longest sequence the model is configured for (max_position_embeddings); with
        `dynamic` rope scaling, none: that scaling exists to run past it, as transformers does."""
        if self.rope.rope_type == "dynamic":
            return 1 << 62
        return _positive_int(self.config, "max_position_embeddings", 2048)

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def model_type(self) -> str:
        return ARCHITECTURES[self.architecture]

    def hf_config(self) -> dict:
        """The config.json to write on export: the imported one, with the architecture made explicit."""
        cfg = dict(self.config)
        cfg["architectures"] = [self.architecture]
        cfg["model_type"] = self.model_type
        return cfg


def _layer_windows(res: dict, model_type: str, n_layers: int) -> tuple:
    """Per layer, the sliding window transformers' modeling applies (None: full attention)."""
    window = res.get("sliding_window")
    if window is not None:
        window = _positive_int({"sliding_window": window}, "sliding_window")
    if model_type == "llama":
        return (None,) * n_layers
    if model_type in ("mistral", "mixtral", "qwen3_moe"):
        # One mask for every layer; Qwen3-MoE's config has already dropped the window unless
        # use_sliding_window.
        return (window,) * n_layers
    # qwen2, qwen3: per layer (the config derives layer_types from use_sliding_window and
    # max_window_layers unless the file gives them).
    types = res.get("layer_types")
    if types is None:
        return (None,) * n_layers
    if not isinstance(types, (list, tuple)) or len(types) != n_layers:
        raise HorizonError(f"config.json: layer_types must list one type per layer ({n_layers}), got {types!r}")
    out = []
    for i, t in enumerate(types):
        if t == "full_attention":
            out.append(None)
        elif t == "sliding_attention":
            if window is None:
                raise HorizonError(
                    f"config.json: layer_types[{i}] is 'sliding_attention' but there is no sliding_window "
                    "(use_sliding_window is false or sliding_window is null)"
                )
            out.append(window)
        else:
            raise HorizonError(
                f"config.json: layer_types[{i}] {t!r} not supported (only 'full_attention' / 'sliding_attention')"
            )
    return tuple(out)
