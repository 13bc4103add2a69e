"""Built-in model configurations (`--preset NAME`): Hugging Face `config.json` dicts.

`tiny` and `tiny-moe` use the shipped byte-level tokenizer's vocabulary and train on the CPU in
a minute or two; `1b` and `7b` are Llama-shaped real sizes, mainly for `horizon plan`.
"""

from __future__ import annotations

import copy

from ..errors import HorizonError

# The shipped tokenizer (assets/tokenizer.json) has exactly this many entries.
SHIPPED_VOCAB = 512

_LLAMA_COMMON = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "use_cache": True,
    "torch_dtype": "float32",
}

PRESETS = {
    "tiny": {
        **_LLAMA_COMMON,
        "vocab_size": SHIPPED_VOCAB,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "tiny-moe": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": "float32",
        "vocab_size": SHIPPED_VOCAB,
        "hidden_size": 128,
        "intermediate_size": 192,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.01,
        "output_router_logits": False,
        "max_position_embeddings": 512,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    # Llama-3.2-1B shape.
    "1b": {
        **_LLAMA_COMMON,
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
    # Llama-2-7B shape.
    "7b": {
        **_LLAMA_COMMON,
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
}

# Presets whose vocabulary is the shipped tokenizer's: the default data needs no other files.
USES_SHIPPED_TOKENIZER = {"tiny", "tiny-moe"}


def names() -> list[str]:
    return sorted(PRESETS)


def get(name: str) -> dict:
    if name not in PRESETS:
        raise HorizonError(f"unknown preset {name!r} (choose from {', '.join(names())})")
    return copy.deepcopy(PRESETS[name])
