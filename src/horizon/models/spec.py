"""The model description Horizon trains from: a validated reading of a Hugging Face
`config.json` for the decoder-only Llama family (Llama, Mistral, Qwen2, Qwen3)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import HorizonError

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

        hidden = _positive_int(cfg, "hidden_size")
        heads = _positive_int(cfg, "num_attention_heads")
        kv_heads = _positive_int(cfg, "num_key_value_heads", heads) if cfg.get("num_key_value_heads") is not None else heads
        if heads % kv_heads:
            raise HorizonError(
                f"config.json: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
            )
        head_dim = cfg.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise HorizonError(f"config.json: hidden_size ({hidden}) not divisible by num_attention_heads ({heads})")
            head_dim = hidden // heads
        head_dim = _positive_int({"head_dim": head_dim}, "head_dim")
        if head_dim % 2:
            raise HorizonError(f"config.json: head_dim must be even for rotary embeddings, got {head_dim}")

        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise HorizonError(f"config.json: hidden_act {act!r} not supported (only 'silu' / SwiGLU)")

        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in (None, "default"):
            raise HorizonError(f"config.json: rope_type {rope_type!r} not supported (only the default RoPE)")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        if not isinstance(theta, (int, float)) or theta <= 0:
            raise HorizonError(f"config.json: rope_theta must be positive, got {theta!r}")

        eps = cfg.get("rms_norm_eps", 1e-6)
        if not isinstance(eps, (int, float)) or eps <= 0:
            raise HorizonError(f"config.json: rms_norm_eps must be positive, got {eps!r}")

        moe = _moe_fields(cfg, model_type)

        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        mlp_bias = bool(cfg.get("mlp_bias", False))

        window = None
        if model_type == "mistral":
            window = cfg.get("sliding_window")
        elif model_type in ("qwen2", "qwen3", "qwen3_moe") and cfg.get("use_sliding_window"):
            window = cfg.get("sliding_window")
        if window is not None:
            window = _positive_int({"sliding_window": window}, "sliding_window")

        init_range = cfg.get("initializer_range", 0.02)
        if not isinstance(init_range, (int, float)) or init_range < 0:
            raise HorizonError(f"config.json: initializer_range must be >= 0, got {init_range!r}")

        return cls(
            architecture=arch,
            vocab_size=_positive_int(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_positive_int(cfg, "intermediate_size"),
            num_layers=_positive_int(cfg, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(eps),
            rope_theta=float(theta),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            initializer_range=float(init_range),
            sliding_window=window,
            config=dict(cfg),
            **moe,
        )

    @property
    def max_positions(self) -> int:
        """The longest sequence the model is configured for (max_position_embeddings)."""
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
