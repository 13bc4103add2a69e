"""What a transformers causal LM is made of, found by running its own forward: the decoder
layer list, which parameters its forward uses before the layers (the prologue), after them
(the epilogue) or not at all, how it calls and unpacks a layer, and every reason the hf path
cannot train it.

The model is built from its config with parameters on the meta device (buffers are real: the
rotary frequencies, embedding scales and router biases a model computes in `__init__`). Its
decoder layers are then swapped for *shims* (`LayerShim`) that record exactly what the model's
own forward hands each layer and return the hidden states unchanged. One such run on a tiny
batch, with every non-layer parameter bound to a distinct zero-stride tensor and a
`TorchFunctionMode` noting which of them each op touches and when, tells the phases apart.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ...errors import HorizonError


class Refusal(HorizonError):
    """The hf path cannot train this model; the message is one line naming why."""


class _Stop(Exception):
    """Raised by the last capture shim: the rest of the forward (norm, head) is not needed."""


# ---------------------------------------------------------------------------------------------
# Building the model on the meta device
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered inside goes to the meta device; buffers and plain tensors
    stay real, so what a model computes in `__init__` (rotary frequencies) is there."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def causal_lm_registry() -> dict:
    """transformers' causal-LM registry: model_type -> class name."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def one_line(e: BaseException) -> str:
    """`Type: first line of the message`, for one-line refusals."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _name_of(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    if archs and isinstance(archs[0], str):
        return archs[0]
    return str(cfg.get("model_type"))


def config_object(cfg: dict):
    """The transformers config for a config.json dict (HorizonError naming what is wrong)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(cfg, dict):
        raise HorizonError(f"config must be a dict (the content of config.json), got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise Refusal(f"{_name_of(cfg)}: model_type {model_type!r} is not a transformers model type")
    cls = CONFIG_MAPPING[model_type]
    try:
        with _quiet_transformers():
            # As transformers reads a config.json: JSON's stand-ins for inf / nan decoded.
            decode = getattr(cls, "_decode_special_floats", None)
            return cls.from_dict(decode(dict(cfg)) if decode else dict(cfg))
    except Exception as e:  # noqa: BLE001 - a config transformers rejects is user input
        raise Refusal(f"{_name_of(cfg)}: transformers rejects this config ({one_line(e)})") from None


def model_class(cfg: dict, config):
    """The causal-LM class: the config's `architectures` entry when it is one of the registry's
    classes, else the registry's class for its model_type."""
    import transformers

    registry = causal_lm_registry()
    classes = set(registry.values())
    archs = cfg.get("architectures") or []
    if archs:
        name = archs[0]
        if name in classes and hasattr(transformers, name):
            return getattr(transformers, name)
    model_type = cfg.get("model_type")
    if model_type not in registry:
        raise Refusal(f"{_name_of(cfg)}: not a causal LM (model_type {model_type!r} is not in transformers' "
                      "causal-LM registry)")
    name = registry[model_type]
    cls = getattr(transformers, name, None)
    if cls is None:
        raise Refusal(f"{name}: transformers does not export this class")
    return cls


def build_meta_model(cfg: dict):
    """(config object, model class, model with meta parameters, in training mode)."""
    config = config_object(cfg)
    cls = model_class(cfg, config)
    name = cls.__name__
    if getattr(config, "is_encoder_decoder", False):
        raise Refusal(f"{name}: encoder-decoder model (the hf path trains decoder-only stacks)")
    attn = cfg.get("_attn_implementation") or cfg.get("attn_implementation")
    try:
        with _quiet_transformers(), _parameters_on_meta():
            model = cls._from_config(config, dtype=torch.float32, attn_implementation=attn)
    except Refusal:
        raise
    except Exception as e:  # noqa: BLE001 - transformers cannot build it: a refusal, with its words
        raise Refusal(f"{name}: transformers cannot build it from this config ({one_line(e)})") from None
    model.train()
    return config, cls, model


# ---------------------------------------------------------------------------------------------
# Shims in place of the decoder layers
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerCall:
    """What the model's forward handed one layer: positional args and keywords, with the
    hidden-states slot emptied (it is the layer's input, which the engine supplies)."""

    args: tuple
    kwargs: dict
    hidden_key: object  # int position in args, or the keyword name
    stores: tuple = ()  # keywords holding an empty mutable store (shared-KV dicts) when captured

    def with_hidden(self, x):
        if isinstance(self.hidden_key, int):
            args = self.args[: self.hidden_key] + (x,) + self.args[self.hidden_key + 1:]
            return args, dict(self.kwargs)
        kwargs = dict(self.kwargs)
        kwargs[self.hidden_key] = x
        return self.args, kwargs


def _hidden_of(args, kwargs):
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"], "hidden_states"
    if args:
        return args[0], 0
    raise HorizonError("a decoder layer was called without hidden states")


def _is_empty_store(v) -> bool:
    """An empty mutable mapping other than a plain dict (e.g. transformers' KVSharingDict)."""
    from collections.abc import MutableMapping

    return isinstance(v, MutableMapping) and not isinstance(v, dict) and len(v) == 0


class _Sentinel:
    """Stands for a layer output besides the hidden states during discovery."""


class ShimRun:
    """One forward of the model with shims in place of its layers.

    mode "capture": record every layer's call and stop after the last one; "replay": return
    `replay` from the last layer (the epilogue then runs on it); "discover": record and pass the
    hidden states through every layer, checking the order and the hand-over."""

    def __init__(self, n_layers: int, mode: str, returns=1, replay=None):
        self.n = n_layers
        self.mode = mode
        self.returns = returns
        self.replay = replay
        self.calls: list = []
        self.first_hidden = None
        self.handed = []  # discover: whether layer i received what layer i-1 returned
        self._last_out = None
        self.on_phase = None  # discover: callback(phase) for the tracer
        self.extras: list = []  # discover: the sentinels handed out

    def _wrap(self, h):
        # `returns`: 0 a tensor, k a k-tuple (the hidden states, then k - 1 outputs the model
        # drops; in discovery each is a sentinel, so one handed on to a later layer shows).
        if not self.returns:
            return h
        extra = [_Sentinel() if self.mode == "discover" else None for _ in range(self.returns - 1)]
        self.extras.extend(e for e in extra if e is not None)
        return (h, *extra)

    def on_layer(self, index: int, args, kwargs):
        if index != len(self.calls):
            raise Refusal(f"decoder layer {index} called out of order (expected layer {len(self.calls)}): "
                          "the layers do not run once each, in order")
        hidden, key = _hidden_of(args, kwargs)
        if index == 0:
            self.first_hidden = hidden
            if self.on_phase:
                self.on_phase("between")
        else:
            self.handed.append(hidden is self._last_out)
        stores = tuple(k for k, v in kwargs.items() if _is_empty_store(v))
        if isinstance(key, int):
            rest = args[:key] + (None,) + args[key + 1:]
            self.calls.append(LayerCall(rest, dict(kwargs), key, stores))
        else:
            kw = dict(kwargs)
            kw[key] = None
            self.calls.append(LayerCall(tuple(args), kw, key, stores))
        last = index == self.n - 1
        if self.mode == "capture" and last:
            raise _Stop
        out = self.replay if (self.mode == "replay" and last) else hidden
        self._last_out = out
        if last and self.on_phase:
            self.on_phase("epilogue")
        return self._wrap(out)


class LayerShim(nn.Module):
    """Stands in for decoder layer `index`; attribute reads the forward makes on the layer
    (`attention_type`, `is_sliding`, ...) fall through to the real (meta) layer."""

    def __init__(self, index: int, layer: nn.Module, run: ShimRun):
        super().__init__()
        object.__setattr__(self, "_shim_layer", layer)
        object.__setattr__(self, "_shim_run", run)
        object.__setattr__(self, "_shim_index", index)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_shim_layer"), name)

    def forward(self, *args, **kwargs):
        return self._shim_run.on_layer(self._shim_index, args, kwargs)


@contextlib.contextmanager
def shims_in_place(model: nn.Module, layers_path: str, run: ShimRun):
    parent_path, _, attr = layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    real = parent._modules[attr]
    parent._modules[attr] = nn.ModuleList([LayerShim(i, layer, run) for i, layer in enumerate(real)])
    try:
        yield real
    finally:
        parent._modules[attr] = real


def forward_kwargs(model: nn.Module, input_ids, position_ids=None) -> dict:
    """The keywords a causal LM's forward gets from the hf path: the ids, no cache, and
    position ids when given (only those the forward accepts)."""
    params = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kw = {"input_ids": input_ids}
    if "use_cache" in params or takes_any:
        kw["use_cache"] = False
    if position_ids is not None:
        kw["position_ids"] = position_ids
    return kw


def zero_stride(shape, dtype, device, requires_grad=False) -> torch.Tensor:
    """A tensor of `shape` that reads as zeros and owns one element: stands in for weights
    a run needs present but whose values do not matter."""
    base = torch.zeros((), dtype=dtype, device=device)
    if requires_grad:
        base.requires_grad_()
    return base.expand(tuple(shape))


def logits_of(out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(logits, torch.Tensor):
        raise HorizonError(f"the model's forward returned {type(out).__name__} without logits")
    return logits


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------


class _UseTracer(TorchFunctionMode):
    """Notes, for each watched tensor (by identity), the phases of the forward it is used in."""

    def __init__(self, watched: dict):
        super().__init__()
        self.watched = watched  # id(tensor) -> name
        self.phase = None
        self.used: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.phase is not None:
            for leaf in pytree.tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor):
                    name = self.watched.get(id(leaf))
                    if name is not None:
                        self.used.setdefault(name, set()).add(self.phase)
        return func(*args, **kwargs)


@dataclass
class Structure:
    """The result of discovery (see the module doc)."""

    name: str                     # the causal-LM class name
    config: object                # the transformers config
    model: nn.Module              # meta parameters, real buffers; layers in place
    layers_path: str              # e.g. "model.layers"
    num_layers: int
    returns: int                  # how a layer returns: 0 a tensor, k a k-tuple led by the hidden states
    prologue: list                # non-layer parameter names the forward uses before layer 0
    epilogue: list                # ... after the last layer (the tied input embedding may be in both)
    unused: list                  # non-layer parameters the forward never uses: kept, not trained
    embed_name: str               # the input embedding weight (a prologue parameter)
    tied: bool                    # the epilogue uses the input embedding weight as its head
    layer_buffers_persistent: set = field(default_factory=set)  # full names of persistent buffers
    nonlayer_buffers: list = field(default_factory=list)         # full names of non-layer buffers
    frozen: set = field(default_factory=set)  # parameters transformers does not train: kept, bound, not trained

    def layer(self, i: int) -> nn.Module:
        return self.model.get_submodule(self.layers_path)[i]


def _num_layers_hint(config) -> int | None:
    try:
        text = config.get_text_config()
    except Exception:  # noqa: BLE001
        text = config
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        v = getattr(text, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _find_layer_list(name: str, model: nn.Module, config) -> str:
    hint = _num_layers_hint(config)
    candidates = []
    for path, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            n_params = sum(p.numel() for p in mod.parameters())
            if n_params:
                candidates.append((len(mod) == hint, n_params, path, mod))
    if not candidates:
        raise Refusal(f"{name}: no decoder layer list found (no nn.ModuleList of layers with parameters)")
    candidates.sort(key=lambda c: (c[0], c[1]), reverse=True)
    return candidates[0][2]


def _check_shared_parameters(name: str, model: nn.Module, layers_path: str) -> None:
    """A parameter may be shared only outside the layers (a tied head)."""
    owners: dict = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    prefix = layers_path + "."
    for names in owners.values():
        if len(names) > 1 and any(n.startswith(prefix) for n in names):
            raise Refusal(f"{name}: parameter {names[0]} is shared with {names[1]} (weights shared across layers)")


def _canonical_names(model: nn.Module) -> dict:
    """id(parameter) -> its name; for tied parameters the name transformers keeps on save."""
    named = list(model.named_parameters(remove_duplicate=False))
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        kept = set(remove_tied_weights_from_state_dict(dict(named), model))
    except Exception:  # noqa: BLE001 - then the first name, as named_parameters() gives it
        kept = {n for n, _ in named}
    canon: dict = {}
    for n, p in named:
        if id(p) not in canon or (canon[id(p)] not in kept and n in kept):
            canon[id(p)] = n
    return canon


def _input_embedding_name(model: nn.Module, canon: dict) -> str | None:
    try:
        emb = model.get_input_embeddings()
    except Exception:  # noqa: BLE001 - not every model implements it
        return None
    w = getattr(emb, "weight", None)
    return canon.get(id(w)) if w is not None else None


def _describe_cache(value) -> str | None:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return None
    for leaf in pytree.tree_leaves(value, is_leaf=lambda x: isinstance(x, Cache)):
        if isinstance(leaf, Cache):
            return type(leaf).__name__
    return None


def discover(cfg: dict) -> Structure:
    """Builds the model on the meta device and finds its structure; raises `Refusal` with one
    line naming the architecture and the reason when the hf path cannot train it."""
    config, cls, model = build_meta_model(cfg)
    name = cls.__name__
    _check_config(name, config)
    layers_path = _find_layer_list(name, model, config)
    layers = model.get_submodule(layers_path)
    n = len(layers)
    _check_shared_parameters(name, model, layers_path)

    prefix = layers_path + "."
    # Parameters transformers does not train (requires_grad False, e.g. fixed sinusoidal
    # position tables) are kept and bound like buffers, never trained.
    canon = _canonical_names(model)
    params = [(canon[id(p)], p) for _, p in model.named_parameters()]
    frozen = {pn for pn, p in params if not p.requires_grad}
    nonlayer = [(pn, p) for pn, p in params if not pn.startswith(prefix) and pn not in frozen]
    persistent = set(model.state_dict().keys())
    layer_buffers_persistent = {bn for bn, _ in model.named_buffers() if bn.startswith(prefix) and bn in persistent}
    nonlayer_buffers = [bn for bn, _ in model.named_buffers() if not bn.startswith(prefix)]
    embed_name = _input_embedding_name(model, canon)

    vocab = getattr(config.get_text_config(), "vocab_size", None) if hasattr(config, "get_text_config") else None
    vocab = vocab if isinstance(vocab, int) and vocab > 0 else 8
    ids = (torch.arange(16).view(2, 8) * 7 + 1) % vocab

    last_error = None
    for returns in (0, 1, 2, 3):
        bound = {pn: zero_stride(p.shape, torch.float32, "cpu", requires_grad=True) for pn, p in nonlayer}
        tracer = _UseTracer({id(t): pn for pn, t in bound.items()})
        run = ShimRun(n, "discover", returns=returns, replay=None)
        run.on_phase = lambda phase, tr=tracer: setattr(tr, "phase", phase)
        bufs = {bn: b for bn, b in model.named_buffers() if not bn.startswith(prefix)}
        bufs.update({pn: zero_stride(p.shape, torch.float32, "cpu") for pn, p in params
                     if pn in frozen and not pn.startswith(prefix)})
        hook = model.register_forward_pre_hook(lambda *_a, tr=tracer: setattr(tr, "phase", "prologue"))
        try:
            with _quiet_transformers(), shims_in_place(model, layers_path, run), tracer, torch.enable_grad():
                out = torch.func.functional_call(model, (bound, bufs), (), forward_kwargs(model, ids),
                                                 tie_weights=True, strict=False)
            logits_of(out)
        except Refusal as e:
            raise Refusal(f"{name}: {e}") from None
        except Exception as e:  # noqa: BLE001 - the forward does not run with shims: say why
            last_error = last_error or e
            continue
        finally:
            hook.remove()
        if len(run.calls) != n:
            raise Refusal(f"{name}: the forward called {len(run.calls)} of its {n} decoder layers")
        if all(run.handed):
            handed_on = {id(x) for x in run.extras}
            for i, call in enumerate(run.calls):
                for leaf in pytree.tree_leaves((call.args, call.kwargs)):
                    if id(leaf) in handed_on:
                        raise Refusal(f"{name}: decoder layer {i} is handed another layer's output besides the "
                                      "hidden states (state across layers)")
            if any(id(leaf) in handed_on for leaf in pytree.tree_leaves(out)):
                raise Refusal(f"{name}: its output uses the decoder layers' outputs besides the hidden states")
            break
        last_error = None
    else:
        if last_error is not None:
            raise Refusal(f"{name}: its forward does not run with the decoder layers stood in for "
                          f"({one_line(last_error)})")
        raise Refusal(f"{name}: the forward changes the hidden states between decoder layers "
                      "(not a plain stack of layers)")

    for i, call in enumerate(run.calls):
        cache = _describe_cache((call.args, call.kwargs))
        if cache is not None:
            raise Refusal(f"{name}: decoder layer {i} is handed a {cache}: the model needs a cache to run")
        for leaf in pytree.tree_leaves((call.args, call.kwargs)):
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                raise Refusal(f"{name}: decoder layer {i} is handed a tensor computed from the model's weights "
                              "besides its hidden states (its layers are not self-contained)")
    if run.first_hidden is None or not isinstance(run.first_hidden, torch.Tensor):
        raise Refusal(f"{name}: the first decoder layer is not handed hidden states")
    # One hidden state and one row of logits per token: what lets the epilogue run on chunks
    # of positions and the loss use the token's label.
    if tuple(run.first_hidden.shape[:2]) != tuple(ids.shape):
        raise Refusal(f"{name}: its layers run on hidden states of shape {tuple(run.first_hidden.shape)} for "
                      f"{tuple(ids.shape)} tokens (not one position per token)")
    if tuple(logits_of(out).shape[:2]) != tuple(ids.shape):
        raise Refusal(f"{name}: its head gives logits of shape {tuple(logits_of(out).shape)} for {tuple(ids.shape)} "
                      "tokens (not one row per token)")

    used = tracer.used
    between = sorted(pn for pn, phases in used.items() if "between" in phases)
    if between:
        raise Refusal(f"{name}: its forward runs weights between decoder layers ({between[0]})")
    prologue = [pn for pn, _ in nonlayer if "prologue" in used.get(pn, ())]
    epilogue = [pn for pn, _ in nonlayer if "epilogue" in used.get(pn, ())]
    unused = [pn for pn, _ in nonlayer if pn not in used]
    if not prologue:
        raise Refusal(f"{name}: no embedding found before the first decoder layer")
    if embed_name is None or embed_name not in prologue:
        embed_name = prologue[0]
    both = [pn for pn in prologue if pn in epilogue]
    tied = False
    for pn in both:
        if pn != embed_name:
            raise Refusal(f"{name}: parameter {pn} is used both before and after the decoder layers")
        tied = True
    if tied:
        epilogue = [pn for pn in epilogue if pn != embed_name]
    if not epilogue and not tied:
        raise Refusal(f"{name}: no head found after the last decoder layer")
    return Structure(
        name=name, config=config, model=model, layers_path=layers_path, num_layers=n, returns=returns,
        prologue=prologue, epilogue=epilogue, unused=unused, embed_name=embed_name, tied=tied,
        layer_buffers_persistent=layer_buffers_persistent, nonlayer_buffers=nonlayer_buffers, frozen=frozen,
    )


def _check_config(name: str, config) -> None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    shared = getattr(text, "num_kv_shared_layers", 0)
    if isinstance(shared, int) and shared > 0:
        raise Refusal(f"{name}: num_kv_shared_layers {shared} (later layers reuse earlier layers' keys and values: "
                      "state across layers)")
    if getattr(text, "output_router_logits", False):
        coef = getattr(text, "router_aux_loss_coef", None)
        if coef:
            raise Refusal(f"{name}: output_router_logits with router_aux_loss_coef {coef} (the load-balancing "
                          "loss couples the layers; the hf path trains without it: set output_router_logits "
                          "false)")
