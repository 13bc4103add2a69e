"""`HFModelSpec`: the hf path's model description, with the same interface the engine, the
host store and the trainer read from a native `ModelSpec` (sizes, tying, layer list, config)."""

from __future__ import annotations

import copy
import math

import torch

from ...errors import HorizonError
from .structure import Structure, _quiet_transformers, discover

_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
_TOPK_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k", "experts_per_token")


def _text_config(config):
    try:
        return config.get_text_config()
    except Exception:  # noqa: BLE001
        return config


def _first_int(obj, keys):
    for k in keys:
        v = getattr(obj, k, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return 0


class HFModelSpec:
    """A transformers causal LM trained through its own modules (see `horizon.models.hf`)."""

    model_path = "hf"
    # The engine's own load-balancing-loss path is for the native MoE template; here any
    # router loss would be the model's own (refused at discovery when it couples the layers).
    router_aux_loss_coef = 0.0
    moe_layers = ()
    sliding_window = None  # windows are the model's own masks: no sequence limit from them

    def __init__(self, cfg: dict, structure: Structure):
        self.config = dict(cfg)
        self.structure = structure
        s = structure
        self.architecture = s.name
        self.model_type = cfg.get("model_type")
        emb = tuple(s.model.get_parameter(s.embed_name).shape)
        if len(emb) != 2:
            raise HorizonError(f"{s.name}: the input embedding {s.embed_name} is not a matrix: {emb}")
        self.vocab_size, self.hidden_size = emb
        self.num_layers = s.num_layers
        self.tie_word_embeddings = s.tied
        text = _text_config(s.config)
        self.num_experts = _first_int(text, _EXPERT_KEYS)
        self.num_experts_per_tok = _first_int(text, _TOPK_KEYS) if self.num_experts else 0
        init = getattr(text, "initializer_range", 0.02)
        self.initializer_range = float(init) if isinstance(init, (int, float)) else 0.02
        self._defs = None

    def __repr__(self) -> str:
        return f"HFModelSpec({self.architecture}, layers={self.num_layers}, hidden={self.hidden_size})"

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "HFModelSpec":
        return cls(cfg, discover(cfg))

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def max_positions(self) -> int:
        """The longest sequence the model is configured for (its text config's
        max_position_embeddings; models without one have no such limit)."""
        text = _text_config(self.structure.config)
        v = getattr(text, "max_position_embeddings", None)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 1 << 62

    def hf_config(self) -> dict:
        """The config.json to write on export: the source's, unchanged but for the architecture."""
        cfg = dict(self.config)
        cfg["architectures"] = [self.architecture]
        return cfg

    # ------------------------------------------------------------------ layers
    def layer_defs(self) -> list:
        from ..layers import LayerDef
        from .templates import BlockTemplate, EpilogueTemplate, PrologueTemplate, _Shared

        if self._defs is None:
            shared = _Shared(self.structure)
            self._defs = (
                [LayerDef("embed", PrologueTemplate(shared))]
                + [LayerDef(f"layers.{i}", BlockTemplate(shared, i), i) for i in range(self.num_layers)]
                + [LayerDef("head", EpilogueTemplate(shared))]
            )
        return self._defs

    def optional_checkpoint_tensors(self) -> dict:
        """Names a checkpoint may carry that this model does not train (a tied head's copy of
        the embedding) -> their shapes."""
        if not self.tie_word_embeddings:
            return {}
        s = self.structure
        embed = s.model.get_parameter(s.embed_name)
        return {n: tuple(p.shape) for n, p in s.model.named_parameters(remove_duplicate=False)
                if p is embed and n != s.embed_name}

    def ignored_checkpoint_patterns(self) -> tuple:
        """Regular expressions of checkpoint names transformers ignores on load for this model
        (`_keys_to_ignore_on_load_unexpected`, e.g. DeepSeek-V3's multi-token-prediction layer)."""
        found = set()
        for module in self.structure.model.modules():
            found.update(getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ())
        return tuple(sorted(found))

    def layer_numels(self) -> dict:
        """Layer key -> parameter count (what each slab holds, before alignment)."""
        return {d.key: sum(math.prod(s) for s in d.shapes.values()) for d in self.layer_defs()}

    # ------------------------------------------------------------------ initialisation
    def init_host_model_(self, host_model, seed: int) -> None:
        """The model's own `_init_weights`, module by module (one materialised at a time),
        under a private RNG seeded with `seed`."""
        s = self.structure
        model = s.model
        with torch.random.fork_rng(devices=[]), _quiet_transformers():
            torch.manual_seed(seed)
            # Data parallel: a rank's slab holds a shard; the full master to initialise is the
            # sharded model's staging copy, committed to the shards by its sync_bf16_().
            full_master = getattr(host_model, "_full_master", None)
            for layer in host_model.layers:
                defn = layer.defn
                views = layer.layout.views(full_master(layer)) if full_master else layer.master_views()
                t = defn.template
                consts = getattr(t, "init_constants", {})  # frozen / unused parameters
                if defn.index is not None:
                    self._init_module_params(model, t.module, {**views, **consts})
                else:
                    full = {getattr(t, "names", {}).get(n, n): v for n, v in views.items()}
                    self._init_named(model, {**full, **consts})

    @staticmethod
    def _init_module_params(model, module, dests: dict) -> None:
        from transformers import initialization as init

        real = copy.deepcopy(module).to_empty(device="cpu")
        with torch.no_grad(), init.guard_torch_init_functions():
            for sub in _post_order(real):
                model._init_weights(sub)
        params = dict(real.named_parameters())
        with torch.no_grad():
            for n, dst in dests.items():
                dst.copy_(params[n].detach().reshape(dst.shape))

    def _init_named(self, model, dests: dict) -> None:
        """Initialises full-named parameters through their owning modules."""
        by_owner: dict = {}
        for n, dst in dests.items():
            owner, _, leaf = n.rpartition(".")
            by_owner.setdefault(owner, {})[leaf] = dst
        for owner, leaves in by_owner.items():
            module = model.get_submodule(owner) if owner else model
            if module is model:  # a parameter of the model itself: HF's default scheme
                for dst in leaves.values():
                    with torch.no_grad():
                        dst.normal_(0.0, self.initializer_range)
                continue
            shallow = copy.copy(module)
            shallow._modules = {}
            shallow._parameters = dict(module._parameters)
            shallow._buffers = dict(module._buffers)
            self._init_module_params(model, shallow, {k: v for k, v in leaves.items()})


def _post_order(module):
    for child in module.children():
        yield from _post_order(child)
    yield module
