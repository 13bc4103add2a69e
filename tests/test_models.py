"""Layer templates against HF transformers: the same weights (passed as plain tensors, the
way the engine passes slot views) give the same hidden states and loss."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from horizon import HorizonError  # noqa: E402
from horizon.models import (  # noqa: E402
    DecoderBlockTemplate,
    ModelSpec,
    layer_defs,
    shift_labels,
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP's
    # spinning makes them 10-100x slower; restored after this module.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, rms_norm_eps=1e-5)

MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.02)
CASES = {
    "llama": (transformers.LlamaConfig, dict(rope_theta=5000.0)),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, **MOE)),
    "qwen3-moe": (transformers.Qwen3MoeConfig, dict(num_experts=4, moe_intermediate_size=32, head_dim=16,
                                                    mlp_only_layers=[1], norm_topk_prob=False, **MOE)),
    "llama-tied-bias": (transformers.LlamaConfig, dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=64)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=24)),
}


def _hf_model(case, seed=0, path=None):
    cls, extra = CASES[case]
    cfg = cls(**BASE, **extra, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    # Random norms and biases too, so a mixed-up name or layout shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    cfg_dict = cfg.to_dict()
    cfg_dict["architectures"] = [type(model).__name__]
    return model, cfg_dict


def _disk_state(model, path):
    """The tensors as transformers writes them (per-expert for MoE)."""
    from safetensors.torch import load_file

    model.save_pretrained(path)
    return load_file(str(path / "model.safetensors"))


def _bind(defn, disk):
    """Binds the template to a flat buffer filled through the HF name mapping, as the import does."""
    from horizon.store import SlabLayout

    layout = SlabLayout.from_shapes(defn.shapes)
    views = layout.views(torch.zeros(layout.numel))
    mapping = defn.hf_tensors(views)
    for name, t in mapping.items():
        t.copy_(disk[name])
    return views, set(mapping)


@pytest.mark.parametrize("case", sorted(CASES))
def test_templates_match_hf_forward_and_loss(case, tmp_path):
    model, cfg = _hf_model(case)
    spec = ModelSpec.from_hf_config(cfg)
    disk = _disk_state(model, tmp_path / "m")
    defs = layer_defs(spec)
    bound, names = [], set()
    for d in defs:
        views, n = _bind(d, disk)
        bound.append(views)
        names |= n
    assert names == set(disk), "template names must cover the HF checkpoint exactly"

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, BASE["vocab_size"], (3, 12), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, output_hidden_states=True)

    from horizon import kernels

    with torch.no_grad():
        x = defs[0].template.forward(bound[0], ids)
        torch.testing.assert_close(x, out.hidden_states[0], rtol=0, atol=0)
        cos, sin = kernels.rope_cos_sin(torch.arange(12), spec.head_dim, spec.rope_theta)
        stats = []
        for i, d in enumerate(defs[1:-1]):
            x = d.template.forward(bound[i + 1], x, cos, sin, router_stats=stats)
            if i + 1 < spec.num_layers:  # HF's last hidden state is after the final norm
                torch.testing.assert_close(x, out.hidden_states[i + 1], rtol=1e-5, atol=1e-5)
        head = defs[-1]
        hw = bound[0]["weight"] if spec.tie_word_embeddings else None
        shifted = shift_labels(labels)
        loss = head.template.loss_sum(bound[-1], x, shifted, hw) / (shifted != -100).sum()
        if spec.is_moe:
            # HF's load-balancing loss from the per-layer router statistics.
            assert len(stats) == len(spec.moe_layers)
            rows = n_layers_tokens = len(stats) * ids.numel()
            probs = sum(p for p, _ in stats) / rows
            counts = sum(c for _, c in stats) / n_layers_tokens
            aux = spec.num_experts * (probs * counts).sum()
            torch.testing.assert_close(aux, out.aux_loss, rtol=1e-5, atol=1e-7)
            loss = loss + spec.router_aux_loss_coef * aux
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)


def test_spec_reads_rope_and_flags():
    _, cfg = _hf_model("qwen3")
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.qk_norm and not spec.qkv_bias and spec.head_dim == 24
    _, cfg = _hf_model("qwen2")
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.qkv_bias and not spec.o_bias and spec.tie_word_embeddings
    _, cfg = _hf_model("llama")
    assert ModelSpec.from_hf_config(cfg).rope_theta == 5000.0
    # The pre-5.x spelling.
    old = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    old["rope_theta"] = 123.0
    assert ModelSpec.from_hf_config(old).rope_theta == 123.0


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "su", "rope_theta": 1e4}}, "rope_type"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "factor"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
        ({"vocab_size": -5}, "vocab_size"),
    ],
)
def test_spec_rejects_bad_configs(patch, message):
    _, cfg = _hf_model("llama")
    cfg.update(patch)
    with pytest.raises(HorizonError, match=message):
        ModelSpec.from_hf_config(cfg)


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
        ({"router_jitter_noise": 0.1}, "router_jitter_noise"),
        ({"num_local_experts": 0}, "num_local_experts"),
    ],
)
def test_spec_rejects_bad_moe_configs(patch, message):
    _, cfg = _hf_model("mixtral")
    cfg.update(patch)
    with pytest.raises(HorizonError, match=message):
        ModelSpec.from_hf_config(cfg)


def test_spec_reads_moe_layers():
    _, cfg = _hf_model("qwen3-moe")
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.moe_layers == (0,) and spec.num_experts == 4 and not spec.renormalize_topk
    assert spec.router_aux_loss_coef == 0.02
    cfg["output_router_logits"] = False
    assert ModelSpec.from_hf_config(cfg).router_aux_loss_coef == 0.0
    _, cfg = _hf_model("mixtral")
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.moe_layers == (0, 1) and spec.renormalize_topk and spec.moe_intermediate_size == 96


def test_spec_rejects_non_dict():
    with pytest.raises(HorizonError, match="dict"):
        ModelSpec.from_hf_config("config.json")


def test_block_template_holds_no_parameters():
    _, cfg = _hf_model("llama")
    block = DecoderBlockTemplate(ModelSpec.from_hf_config(cfg))
    assert not any(isinstance(v, torch.Tensor) for v in vars(block).values())
