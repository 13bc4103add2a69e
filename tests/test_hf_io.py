"""HF model directories: import into the host slabs and export back, checked against
what transformers itself reads and writes."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import horizon  # noqa: E402
from horizon import HorizonError  # noqa: E402
from horizon.io import hf  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP's
    # spinning makes them 10-100x slower; restored after this module.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

BASE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)


def _save(tmp_path, cls, name="model", seed=0, **extra):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cls(**BASE, **extra)).float()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.normal_(1.0, 0.1)
    path = tmp_path / name
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize(
    "cls, extra",
    [
        (transformers.LlamaConfig, {}),
        (transformers.MistralConfig, {"sliding_window": 32}),
        (transformers.Qwen2Config, {"tie_word_embeddings": True}),
        (transformers.Qwen3Config, {"head_dim": 16}),
        (transformers.MixtralConfig, {"num_local_experts": 3, "num_experts_per_tok": 2}),
        (transformers.Qwen3MoeConfig, {"num_experts": 3, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                                       "mlp_only_layers": [0], "tie_word_embeddings": True}),
    ],
)
def test_import_export_round_trip_is_exact(tmp_path, cls, extra):
    from safetensors.torch import load_file

    path, model = _save(tmp_path, cls, **extra)
    disk = load_file(str(path / "model.safetensors"))  # transformers' own on-disk names
    trainer = horizon.Trainer.from_pretrained(path, device="cpu")
    views = trainer.model.hf_views()
    assert set(views) == set(disk)
    for name, t in disk.items():
        assert torch.equal(views[name], t), name
    out = tmp_path / "export"
    trainer.save_pretrained(out)
    assert set(load_file(str(out / "model.safetensors"))) == set(disk)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(loaded) is type(model)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [type(model).__name__]
    # The bf16 compute copy was filled from the imported master.
    for layer in trainer.model.layers:
        assert torch.equal(layer.slab.weights_bf16, layer.slab.master.to(torch.bfloat16))


def test_sharded_export_and_import(tmp_path):
    path, model = _save(tmp_path, transformers.LlamaConfig)
    trainer = horizon.Trainer.from_pretrained(path, device="cpu")
    out = tmp_path / "sharded"
    trainer.save_pretrained(out, max_shard_bytes=20_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and (out / hf.INDEX).is_file()
    index = json.loads((out / hf.INDEX).read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    again = horizon.Trainer.from_pretrained(out, device="cpu")
    for name, t in again.model.hf_views().items():
        assert torch.equal(t, trainer.model.hf_views()[name])


def test_bf16_export(tmp_path):
    path, model = _save(tmp_path, transformers.LlamaConfig)
    trainer = horizon.Trainer.from_pretrained(path, device="cpu")
    out = tmp_path / "bf16"
    trainer.save_pretrained(out, dtype=torch.bfloat16)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    for name, t in model.state_dict().items():
        got = loaded.state_dict()[name]
        assert got.dtype == torch.bfloat16 and torch.equal(got, t.to(torch.bfloat16)), name


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(HorizonError, match="does not exist"):
        horizon.Trainer.from_pretrained(tmp_path / "nope", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HorizonError, match="config.json"):
        horizon.Trainer.from_pretrained(tmp_path / "empty", device="cpu")


def test_no_weights(tmp_path):
    path, _ = _save(tmp_path, transformers.LlamaConfig)
    (path / "model.safetensors").unlink()
    with pytest.raises(HorizonError, match="safetensors"):
        horizon.Trainer.from_pretrained(path, device="cpu")


def test_architecture_mismatch_is_caught(tmp_path):
    # Qwen2 weights (with q/k/v biases) under a Llama config: unexpected tensors.
    path, _ = _save(tmp_path, transformers.Qwen2Config)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HorizonError, match="unexpected tensor"):
        horizon.Trainer.from_pretrained(path, device="cpu")


def test_shape_mismatch_and_missing_tensor(tmp_path):
    path, _ = _save(tmp_path, transformers.LlamaConfig)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HorizonError, match="shape"):
        horizon.Trainer.from_pretrained(path, device="cpu")

    from safetensors.torch import load_file, save_file

    path2, _ = _save(tmp_path, transformers.LlamaConfig, name="m2")
    tensors = load_file(str(path2 / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path2 / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HorizonError, match="up_proj"):
        horizon.Trainer.from_pretrained(path2, device="cpu")


def test_save_rejects_bad_arguments(tmp_path):
    with pytest.raises(HorizonError, match="max_shard_bytes"):
        hf.save(tmp_path / "x", {}, {}, max_shard_bytes=0)
    with pytest.raises(HorizonError, match="dtype"):
        hf.save(tmp_path / "x", {}, {}, dtype=torch.int32)
