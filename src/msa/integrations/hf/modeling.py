"""GQA decoders of the Hugging Face families made MSA: the Index Branch, ``convert``, the MSA model classes.

Each converted layer's attention module keeps its own Q/K/V/O projections
(and norms, biases, RoPE: whatever its family does) and gains an Index Branch
(:class:`HFIndexBranch`, an :class:`msa.nn.IndexBranch`, as ``msa_index``)
that reads a detached copy of the layer's input. The model's attention
implementation becomes ``"msa"``, registered with transformers' attention
interface: it receives the family's rotated q, k, v and runs
:func:`msa.nn.index_branch.msa_attention` on converted layers, SDPA on the others.

A converted model is an instance of an MSA subclass of its family's class
(``MSALlamaForCausalLM``, model type ``msa_llama``, ...), registered with
transformers' Auto classes: ``save_pretrained`` writes safetensors and a
config of that model type (with the MSA settings in ``config.msa`` and an
``auto_map`` to a two-line ``modeling_msa.py``), and
``AutoModelForCausalLM.from_pretrained`` of the folder returns the MSA model
after ``import msa.integrations.hf``, or with ``trust_remote_code=True``;
without either, transformers refuses the unknown model type.
"""

from __future__ import annotations

import inspect
import json
from functools import cache
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
from transformers.generation.configuration_utils import GenerationMode
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from msa.fp8 import FP8_DTYPE, FP8_NAME, index_dtype_from_name, rounded
from msa.integrations.hf.cache import MSACache
from msa.nn.index_branch import MODES, IndexBranch, check_kl_topk
from msa.ops.backend import compute_dtype
from msa.ops.checks import INDEX_DTYPES, capturing, check_tensor
from msa.reference import msa_attention_suffix

ATTENTION = "msa"
FAMILIES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
MODELING_FILE = "modeling_msa.py"
MODELING_SOURCE = '''"""This MSA checkpoint's classes for transformers' Auto classes (trust_remote_code=True); needs msa."""
from msa.integrations.hf import msa_classes

{config}, {model} = msa_classes("{base}")
'''


class HFIndexBranch(IndexBranch):
    """The Index Branch of a converted layer, with what a transformers attention module needs around it: the Main
    Branch's ``mode``, the inputs kept from the forward pre-hook for the attention call, and the last forward's KL
    loss (and, with ``record_block_indices``, its selection). ``deterministic``: the ops' argument for this layer's
    sparse attention and KL loss (None, the default, follows ``torch.use_deterministic_algorithms``; see
    :func:`msa.sparse_attention`)."""

    def __init__(self, hidden_size: int, num_kv_heads: int, index_head_dim: int, *, mode: str, **settings):
        super().__init__(hidden_size, num_kv_heads, index_head_dim, **settings)
        self.mode = mode
        self.compute_kl_loss: bool | None = None  # None: while training
        self.deterministic: bool | None = None
        self.record_block_indices = False
        self.kl_loss: torch.Tensor | None = None  # the last forward's, read by :func:`kl_loss`
        self.block_indices: torch.Tensor | None = None  # the last forward's, when recorded
        self._inputs: tuple | None = None

    def project(self, hidden_states: torch.Tensor, position_embeddings, cache, layer: int) -> None:
        """Index queries ``[B, S, G, Di]`` and keys ``[B, S, 1, Di]`` of the layer input (detached), kept for
        the attention call that follows, with the KV cache. An :class:`MSACache` stores the new index keys itself
        (when the attention runs); another transformers cache gets all of the sequence's kept beside it."""
        index_q, index_k = self(hidden_states, position_embeddings)
        if cache is not None and not isinstance(cache, MSACache):
            store = getattr(cache, "msa_index_keys", None)
            if store is None:
                store = cache.msa_index_keys = {}
            if layer in store:
                index_k = torch.cat([store[layer], index_k], dim=1)
            store[layer] = index_k
        self._inputs = (index_q, index_k, cache)

    def take_inputs(self) -> tuple:
        """``(index_q, index_k, cache)`` of the last :meth:`project`, forgotten after this call."""
        inputs, self._inputs = self._inputs, None
        return inputs


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no decoder layers at .model.layers (expected a Llama-, Qwen2-, "
                        "Qwen3- or Mistral-style causal LM)")
    return [layer.self_attn for layer in layers]


def _index_branch(module: nn.Module) -> HFIndexBranch | None:
    return getattr(module, "msa_index", None)


def _project_before_attention(module, args, kwargs):
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    position_embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
    # transformers >= 5.2x passes the KV cache as ``cache=`` (``past_key_values=`` before, still accepted)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    module.msa_index.project(hidden_states, position_embeddings, cache, module.layer_idx)


def _check_config(config, layers: list[int]) -> None:
    """Refuse what MSA layers cannot honour: sliding-window attention, attention dropout."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        sliding = [i for i in layers if layer_types[i] != "full_attention"]
        if sliding:
            raise ValueError(f"layers {sliding} use {layer_types[sliding[0]]!r} (config.layer_types); MSA layers "
                             "attend causally over the whole sequence: convert only full-attention layers "
                             "(layers=[...])")
    elif getattr(config, "sliding_window", None) is not None:
        raise ValueError(f"config.sliding_window is {config.sliding_window}: MSA layers attend causally over the "
                         "whole sequence, not a window; set config.sliding_window = None first to convert (the model "
                         "then attends beyond its window)")
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(f"config.attention_dropout is {config.attention_dropout}; MSA layers have no attention "
                         "dropout: set it to 0.0 first")


def _add_index_branches(model: nn.Module, *, block_size: int, topk: int, index_head_dim: int, layers: list[int],
                        mode: str, index_rope: bool, kl_topk: int | None, index_dtype: str | None,
                        init_from_attention: bool) -> None:
    modules, config = _attention_modules(model), model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_kv, n_heads = config.num_key_value_heads, config.num_attention_heads
    parameter = next(model.parameters())
    for i in layers:
        module = modules[i]
        branch = HFIndexBranch(config.hidden_size, n_kv, index_head_dim, mode=mode, head_dim=head_dim,
                               block_size=block_size, topk=topk, index_rope=index_rope, kl_topk=kl_topk,
                               index_dtype=index_dtype_from_name(index_dtype))
        branch.to(device=parameter.device, dtype=parameter.dtype)
        if init_from_attention and index_head_dim == head_dim:
            with torch.no_grad():
                q_weight = module.q_proj.weight.view(n_kv, n_heads // n_kv, head_dim, -1).mean(1)
                branch.index_q_proj.weight.copy_(q_weight.reshape(n_kv * head_dim, -1))
                branch.index_k_proj.weight.copy_(module.k_proj.weight.view(n_kv, head_dim, -1).mean(0))
        module.msa_index = branch
        module.register_forward_pre_hook(_project_before_attention, with_kwargs=True)
    getattr(model, "model", model).register_forward_pre_hook(_check_position_ids, with_kwargs=True)
    model.set_attn_implementation(ATTENTION)


def _check_position_ids(module, args, kwargs):
    """Before the decoder runs: ``position_ids``, when given, must be ``[B, S]`` (or ``[1, S]``) and count up by one
    along each row. transformers reads position ids that restart within a row as sequences packed into it (its
    FlashAttention path attends within each); MSA layers take one sequence per row and would attend across them."""
    position_ids = kwargs.get("position_ids", args[2] if len(args) > 2 else None)
    tokens = kwargs.get("input_ids", args[0] if args else None)
    tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
    if position_ids is None or tokens is None or tokens.dim() < 2:
        return
    (batch, length), expected = tokens.shape[:2], f"[B, S] = [{tokens.shape[0]}, {tokens.shape[1]}] (or [1, S])"
    check_tensor("position_ids", position_ids, 2, expected, dtypes=INDEX_DTYPES)
    if position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != length:
        raise ValueError(f"position_ids must have shape {expected} like the input, got {tuple(position_ids.shape)}")
    if length > 1 and not capturing() and bool((position_ids.diff(dim=-1) != 1).any()):
        raise ValueError("position_ids must count up by one along each row: MSA models take one sequence per row, "
                         "not several packed into it (position ids that restart within a row)")


class _MSACausalLM:
    """What the MSA subclass of a family's causal LM adds: Index Branches built from ``config.msa`` (when
    loaded), ``generate()`` over an :class:`MSACache`, and a save that marks the folder as MSA."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        _add_index_branches(self, **config.msa, init_from_attention=False)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size: int,
                                      max_cache_length: int):
        """``generate()``'s cache: unless one is given (or ``use_cache=False``), an :class:`MSACache` for greedy
        search and sampling (MSA's paged prefill and decode); transformers' own (the exact PyTorch path) for
        beam search and the other modes."""
        if (model_kwargs.get(self._msa_cache_argument) is None and generation_config.use_cache is not False
                and generation_mode in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)):
            sequences = batch_size * (generation_config.num_return_sequences or 1)  # the prompts are repeated
            model_kwargs[self._msa_cache_argument] = MSACache(self, batch_size=sequences, max_length=max_cache_length)
            return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                              max_cache_length)

    def save_pretrained(self, save_directory, *args, **kwargs):
        config_class, model_class = type(self.config), type(self)
        self.config.auto_map = {"AutoConfig": f"{MODELING_FILE[:-3]}.{config_class.__name__}",
                                "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{model_class.__name__}"}
        super().save_pretrained(save_directory, *args, **kwargs)
        Path(save_directory, MODELING_FILE).write_text(MODELING_SOURCE.format(
            config=config_class.__name__, model=model_class.__name__, base=model_class._msa_base))


def msa_classes(base: str | type) -> tuple[type, type]:
    """``(config class, model class)``: the MSA subclasses of a transformers causal LM class (or its name),
    registered with ``AutoConfig`` / ``AutoModelForCausalLM`` under the model type ``msa_<family>``; one pair
    per family, however it is named."""
    return _msa_classes(getattr(transformers, base) if isinstance(base, str) else base)


@cache
def _msa_classes(base: type) -> tuple[type, type]:
    if issubclass(base, _MSACausalLM):
        return base.config_class, base
    config_class = type(f"MSA{base.config_class.__name__}", (base.config_class,),
                        {"model_type": f"msa_{base.config_class.model_type}", "__module__": __name__})
    # transformers >= 5.2x names the KV cache argument ``cache`` (``past_key_values`` before)
    cache_argument = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    model_class = type(f"MSA{base.__name__}", (_MSACausalLM, base),
                       {"config_class": config_class, "__module__": __name__, "_msa_base": base.__name__,
                        "_msa_cache_argument": cache_argument})
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    return config_class, model_class


def convert(model: nn.Module, *, block_size: int = 128, topk: int = 16, index_head_dim: int | None = None,
            layers: list[int] | None = None, mode: str = "sparse", index_rope: bool = True,
            init_from_attention: bool = True, kl_topk: int | None = None,
            index_dtype: torch.dtype | None = None) -> nn.Module:
    """Make ``model``'s attention layers (all, or the indices in ``layers``) MSA, in place; returns the model,
    now an instance of its class's MSA subclass (:func:`msa_classes`).

    ``index_head_dim`` defaults to the model's head dim. With
    ``init_from_attention`` (and ``index_head_dim == head_dim``) the Index
    Branch starts from the attention it learns to imitate: index query ``g`` =
    the mean of group ``g``'s query projections, index key = the mean of the
    key projections; otherwise it starts random. Run the indexer warm-up
    (``set_mode(model, "dense")`` and the KL loss alone) before sparse training.
    ``kl_topk``: the KL loss's support (see :func:`msa.nn.index_branch.msa_attention`).
    ``index_dtype=torch.float8_e4m3fn``: rank blocks with FP8 index vectors
    (:mod:`msa.fp8`), in training, prefill and generation alike.

    Raises ``ValueError`` for what MSA layers cannot honour: sliding-window
    layers, attention dropout (and, when run, padding masks).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_kl_topk(kl_topk, topk)
    if index_dtype not in (None, FP8_DTYPE):
        raise ValueError(f"index_dtype must be None or {FP8_DTYPE}, got {index_dtype}")
    modules = _attention_modules(model)
    if isinstance(model, _MSACausalLM):
        raise ValueError("the model is already MSA")
    chosen = list(range(len(modules))) if layers is None else sorted(set(layers))
    if any(not 0 <= i < len(modules) for i in chosen):
        raise ValueError(f"layers must be in 0..{len(modules) - 1}, got {layers}")
    config = model.config
    _check_config(config, chosen)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    settings = dict(block_size=block_size, topk=topk, index_head_dim=index_head_dim or head_dim, layers=chosen,
                    mode=mode, index_rope=index_rope, kl_topk=kl_topk,
                    index_dtype=None if index_dtype is None else FP8_NAME)
    _add_index_branches(model, **settings, init_from_attention=init_from_attention)
    config.msa = settings
    config.__class__, model.__class__ = msa_classes(type(model))
    return model


def msa_layers(model: nn.Module) -> list[HFIndexBranch]:
    return [branch for module in _attention_modules(model) if (branch := _index_branch(module)) is not None]


def set_mode(model: nn.Module, mode: str) -> None:
    """``"dense"`` (indexer warm-up: dense Main Branch) or ``"sparse"`` for every MSA layer."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for branch in msa_layers(model):
        branch.mode = mode
    model.config.msa["mode"] = mode


def kl_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean KL loss of the MSA layers' last forward (None if none computed one); clears them."""
    losses = []
    for branch in msa_layers(model):
        if branch.kl_loss is not None:
            losses.append(branch.kl_loss)
            branch.kl_loss = None
    return torch.stack(losses).mean() if losses else None


def index_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The Index Branch parameters (what the indexer warm-up trains)."""
    return [p for branch in msa_layers(model) for p in branch.parameters()]


def is_msa_checkpoint(path) -> bool:
    """Whether the folder ``path`` holds a model saved after :func:`convert` (its config has MSA settings)."""
    config = Path(path, "config.json")
    return config.is_file() and "msa" in json.loads(config.read_text())


def from_pretrained(path, **kwargs) -> nn.Module:
    """The MSA model saved in the folder ``path`` (``kwargs`` go to ``from_pretrained``: ``dtype``,
    ``device_map``, ...); also reads folders saved before the MSA model types existed."""
    if not is_msa_checkpoint(path):
        raise ValueError(f"{path} holds no MSA model (no config.json with an 'msa' entry); load it with "
                         "AutoModelForCausalLM.from_pretrained and convert() it")
    config = AutoConfig.from_pretrained(path)
    if not config.model_type.startswith("msa_"):  # saved before the MSA model types
        config.__class__ = msa_classes(AutoModelForCausalLM._model_mapping[type(config)])[0]
    return AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)


def _dense_attention(module, query, key, value, scaling, **kwargs):
    """Layers left dense: SDPA, with the causal mask aligned bottom-right when the queries are the last of the keys."""
    n_queries, n_keys = query.shape[2], key.shape[2]
    if 1 < n_queries < n_keys:
        mask = torch.ones(n_queries, n_keys, dtype=torch.bool, device=query.device).tril(n_keys - n_queries)
        out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                         enable_gqa=True)
        return out.transpose(1, 2), None
    return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, **kwargs)


def msa_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention interface: ``query`` ``[B, Hq, Sq, D]``, ``key``/``value`` ``[B, G, Sk, D]``.

    Returns ``([B, Sq, Hq, D], None)``. Dense layers (not converted) use SDPA.
    """
    if attention_mask is not None:
        raise ValueError("MSA models take unpadded causal sequences: got a padding attention_mask (pass equal-length "
                         "sequences, or one sequence at a time)")
    if dropout:
        raise ValueError("MSA models have no attention dropout; set the config's attention_dropout to 0")
    for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if kwargs.get(name) is not None:
            raise ValueError(f"MSA models take one sequence per row: got {name} (sequences packed into a row, "
                             "transformers' FlashAttention varlen arguments); pass them as rows of a batch")
    branch = _index_branch(module)
    if branch is None:
        return _dense_attention(module, query, key, value, scaling, **kwargs)
    index_q, index_k, cache = branch.take_inputs()
    if branch.selector is not None and (isinstance(cache, MSACache) or query.shape[2] != key.shape[2]):
        raise ValueError(f"MSA layer {module.layer_idx}: an Index Branch selector takes whole sequences (no KV "
                         "cache, no generate())")
    if isinstance(cache, MSACache):
        out, block_indices = cache.attend(module.layer_idx, query, key, value, index_q, index_k, scaling)
    elif index_k.shape[1] != key.shape[2]:
        raise ValueError(f"MSA layer {module.layer_idx}: {index_k.shape[1]} index keys for {key.shape[2]} keys; the "
                         "KV cache must be a transformers Cache passed to the model (the index keys live in it)")
    else:
        out, block_indices = _msa_attention(branch, module, query, key, value, index_q, index_k, scaling)
    if branch.record_block_indices:
        branch.block_indices = block_indices
    return out, None


def _msa_attention(branch, module, query, key, value, index_q, index_k, scaling):
    # one dtype for the kernels: under autocast the family's RoPE may leave q, k in float32 and v in bf16
    q, k, v = (x.transpose(1, 2).to(value.dtype) for x in (query, key, value))  # [B, S, H, D]
    index_q, index_k = index_q.to(value.dtype), index_k.to(value.dtype)
    if q.shape[1] == k.shape[1]:  # the whole sequence: the fast ops (training, prefill), or the selector's blocks
        compute_kl = module.training if branch.compute_kl_loss is None else branch.compute_kl_loss
        out, branch.kl_loss, block_indices = branch.attend(q, k, v, index_q, index_k, mode=branch.mode,
                                                           compute_kl_loss=compute_kl, softmax_scale=scaling,
                                                           deterministic=branch.deterministic)
        return out, block_indices
    # queries after a prefix in a transformers cache: the exact PyTorch definition, one sequence at a time
    compute = compute_dtype(q.dtype)
    if branch.index_dtype == FP8_DTYPE:  # the FP8 ranking of msa.select_blocks: on the rounded vectors
        index_q, index_k = rounded(index_q), rounded(index_k)
    results = [msa_attention_suffix(*(x.to(compute) for x in (q[b], k[b], v[b], index_q[b], index_k[b, :, 0])),
                                    block_size=branch.block_size, topk=branch.topk, softmax_scale=scaling)
               for b in range(q.shape[0])]
    return torch.stack([r[0] for r in results]).to(q.dtype), torch.stack([r[1] for r in results])


AttentionInterface.register(ATTENTION, msa_attention_forward)
AttentionMaskInterface.register(ATTENTION, flash_attention_mask)  # None unless there is padding
for _family in FAMILIES:
    msa_classes(_family)
