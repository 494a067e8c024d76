"""Hugging Face transformers (v5) decoders with GQA made MSA in place: Llama, Qwen2, Qwen3, Mistral families.

    model = AutoModelForCausalLM.from_pretrained(...)
    msa.integrations.hf.convert(model, block_size=128, topk=16)   # every layer, or layers=[...]
    out = model(input_ids)
    loss = out.loss + kl_weight * msa.integrations.hf.kl_loss(model)

How: each converted layer's attention module keeps its own Q/K/V/O
projections (and norms, biases, RoPE: whatever its family does) and gains an
Index Branch (``index_q_proj``: hidden -> G x Di, ``index_k_proj``: hidden ->
Di) that reads a detached copy of the layer's input. The model's attention
implementation becomes ``"msa"``, registered with transformers' attention
interface: it receives the family's rotated q, k, v and runs
:func:`msa.nn.attention.msa_attention` on converted layers, SDPA on the others.
With a KV cache (``generate``), queries after the cached prefix go through the
exact PyTorch definition :func:`msa.reference.msa_attention_suffix`; the index
keys are cached beside K and V. For fast serving use :mod:`msa.inference`.

``save_pretrained`` writes the index projections with the other weights and
the MSA settings into ``config.msa``; :func:`from_pretrained` rebuilds the
model, converts it and loads everything back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from msa.fp8 import FP8_DTYPE, FP8_NAME, index_dtype_from_name, rounded
from msa.nn.attention import MODES, check_kl_topk, msa_attention
from msa.nn.rotary import apply_rotary
from msa.ops.block_gather import compute_dtype
from msa.reference import msa_attention_suffix

ATTENTION = "msa"


class IndexBranch(nn.Module):
    """The Index Branch of one layer: one index-query head per KV group, one shared index-key head."""

    def __init__(self, hidden_size: int, num_kv_heads: int, index_head_dim: int, *, block_size: int, topk: int,
                 mode: str, index_rope: bool, kl_topk: int | None = None, index_dtype: torch.dtype | None = None):
        super().__init__()
        self.num_kv_heads, self.index_head_dim = num_kv_heads, index_head_dim
        self.block_size, self.topk, self.mode, self.index_rope = block_size, topk, mode, index_rope
        self.kl_topk = kl_topk  # the KL loss's support: the top kl_topk blocks (None: the selection)
        self.index_dtype = index_dtype  # the ranking's dtype (msa.select_blocks)
        self.index_q_proj = nn.Linear(hidden_size, num_kv_heads * index_head_dim, bias=False)
        self.index_k_proj = nn.Linear(hidden_size, index_head_dim, bias=False)
        self.compute_kl_loss: bool | None = None  # None: while training
        self.record_block_indices = False
        self.kl_loss: torch.Tensor | None = None  # the last forward's, read by :func:`kl_loss`
        self.block_indices: torch.Tensor | None = None  # the last forward's, when recorded
        self._inputs: tuple[torch.Tensor, torch.Tensor] | None = None

    def project(self, hidden_states: torch.Tensor, position_embeddings, cache, layer: int) -> None:
        """Index queries ``[B, S, G, Di]`` and keys ``[B, S, 1, Di]`` of the layer input (detached), kept for
        the attention call that follows. With a KV cache the index keys are cached too (beside K and V), and
        all of the sequence's are kept."""
        x = hidden_states.detach()
        index_q = self.index_q_proj(x).unflatten(-1, (self.num_kv_heads, self.index_head_dim))
        index_k = self.index_k_proj(x).unsqueeze(-2)
        if self.index_rope:
            cos, sin = position_embeddings
            index_q, index_k = apply_rotary(index_q, cos, sin), apply_rotary(index_k, cos, sin)
        if cache is not None:
            store = getattr(cache, "msa_index_keys", None)
            if store is None:
                store = cache.msa_index_keys = {}
            if layer in store:
                index_k = torch.cat([store[layer], index_k], dim=1)
            store[layer] = index_k
        self._inputs = (index_q, index_k)

    def take_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, self._inputs = self._inputs, None
        return inputs


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no decoder layers at .model.layers (expected a Llama-, Qwen2-, "
                        "Qwen3- or Mistral-style causal LM)")
    return [layer.self_attn for layer in layers]


def _index_branch(module: nn.Module) -> IndexBranch | None:
    return getattr(module, "msa_index", None)


def _project_before_attention(module, args, kwargs):
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    position_embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
    # transformers >= 5.2x passes the KV cache as ``cache=`` (``past_key_values=`` before, still accepted)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    module.msa_index.project(hidden_states, position_embeddings, cache, module.layer_idx)


def convert(model: nn.Module, *, block_size: int = 128, topk: int = 16, index_head_dim: int | None = None,
            layers: list[int] | None = None, mode: str = "sparse", index_rope: bool = True,
            init_from_attention: bool = True, kl_topk: int | None = None,
            index_dtype: torch.dtype | None = None) -> nn.Module:
    """Make ``model``'s attention layers (all, or the indices in ``layers``) MSA, in place; returns the model.

    ``index_head_dim`` defaults to the model's head dim. With
    ``init_from_attention`` (and ``index_head_dim == head_dim``) the Index
    Branch starts from the attention it learns to imitate: index query ``g`` =
    the mean of group ``g``'s query projections, index key = the mean of the
    key projections; otherwise it starts random. Run the indexer warm-up
    (``set_mode(model, "dense")`` and the KL loss alone) before sparse training.
    ``kl_topk``: the KL loss's support (see :func:`msa.nn.attention.msa_attention`).
    ``index_dtype=torch.float8_e4m3fn``: rank blocks with FP8 index vectors
    (:mod:`msa.fp8`), in training, prefill and generation alike.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_kl_topk(kl_topk, topk)
    if index_dtype not in (None, FP8_DTYPE):
        raise ValueError(f"index_dtype must be None or {FP8_DTYPE}, got {index_dtype}")
    modules = _attention_modules(model)
    config = model.config
    chosen = list(range(len(modules))) if layers is None else sorted(set(layers))
    if any(not 0 <= i < len(modules) for i in chosen):
        raise ValueError(f"layers must be in 0..{len(modules) - 1}, got {layers}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    index_head_dim = index_head_dim or head_dim
    n_kv, n_heads = config.num_key_value_heads, config.num_attention_heads
    parameter = next(model.parameters())
    for i in chosen:
        module = modules[i]
        if _index_branch(module) is not None:
            raise ValueError(f"layer {i} is already MSA")
        branch = IndexBranch(config.hidden_size, n_kv, index_head_dim, block_size=block_size, topk=topk, mode=mode,
                             index_rope=index_rope, kl_topk=kl_topk, index_dtype=index_dtype)
        branch.to(device=parameter.device, dtype=parameter.dtype)
        if init_from_attention and index_head_dim == head_dim:
            with torch.no_grad():
                q_weight = module.q_proj.weight.view(n_kv, n_heads // n_kv, head_dim, -1).mean(1)
                branch.index_q_proj.weight.copy_(q_weight.reshape(n_kv * head_dim, -1))
                branch.index_k_proj.weight.copy_(module.k_proj.weight.view(n_kv, head_dim, -1).mean(0))
        module.msa_index = branch
        module.register_forward_pre_hook(_project_before_attention, with_kwargs=True)
    config.msa = dict(block_size=block_size, topk=topk, index_head_dim=index_head_dim, layers=chosen, mode=mode,
                      index_rope=index_rope, kl_topk=kl_topk,
                      index_dtype=None if index_dtype is None else FP8_NAME)
    model.set_attn_implementation(ATTENTION)
    return model


def msa_layers(model: nn.Module) -> list[IndexBranch]:
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


def from_pretrained(path, **kwargs) -> nn.Module:
    """Load a model saved after :func:`convert` (``save_pretrained``): rebuild, convert, load all weights."""
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    settings = getattr(model.config, "msa", None)
    if not settings:
        raise ValueError(f"{path} holds no MSA model (its config has no 'msa' entry); use convert() on it")
    convert(model, **{k: settings[k] for k in ("block_size", "topk", "index_head_dim", "layers", "mode",
                                               "index_rope")}, kl_topk=settings.get("kl_topk"),
            index_dtype=index_dtype_from_name(settings.get("index_dtype")),
            init_from_attention=False)
    device = str(next(model.parameters()).device)
    index_state = {name: tensor for file in sorted(Path(path).glob("*.safetensors"))
                   for name, tensor in load_file(file, device=device).items() if ".msa_index." in name}
    missing = [name for name in model.state_dict() if ".msa_index." in name and name not in index_state]
    if missing:
        raise ValueError(f"{path} lacks Index Branch weights, e.g. {missing[0]}")
    model.load_state_dict(index_state, strict=False)
    return model


def msa_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention interface: ``query`` ``[B, Hq, Sq, D]``, ``key``/``value`` ``[B, G, Sk, D]``.

    Returns ``([B, Sq, Hq, D], None)``. Dense layers (not converted) use SDPA.
    """
    branch = _index_branch(module)
    if branch is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask is not None:
        raise ValueError("MSA layers take unpadded causal sequences: got a padding attention_mask (pass equal-length "
                         "sequences, or one sequence at a time)")
    if dropout:
        raise ValueError("MSA layers have no attention dropout; set the config's attention_dropout to 0")
    index_q, index_k = branch.take_inputs()
    if index_k.shape[1] != key.shape[2]:
        raise ValueError(f"MSA layer {module.layer_idx}: {index_k.shape[1]} index keys for {key.shape[2]} keys; the "
                         "KV cache must be a transformers Cache passed as past_key_values (the index keys live in it)")
    # one dtype for the kernels: under autocast the family's RoPE may leave q, k in float32 and v in bf16
    q, k, v = (x.transpose(1, 2).to(value.dtype) for x in (query, key, value))  # [B, S, H, D]
    index_q, index_k = index_q.to(value.dtype), index_k.to(value.dtype)
    if q.shape[1] == k.shape[1]:  # the whole sequence: the fast ops (training, prefill)
        compute_kl = module.training if branch.compute_kl_loss is None else branch.compute_kl_loss
        out, branch.kl_loss, block_indices = msa_attention(
            q, k, v, index_q, index_k, mode=branch.mode, block_size=branch.block_size, topk=branch.topk,
            compute_kl_loss=compute_kl, kl_topk=branch.kl_topk, softmax_scale=scaling, index_dtype=branch.index_dtype)
    else:  # queries after a cached prefix (generation): the exact PyTorch definition, one sequence at a time
        compute = compute_dtype(q.dtype)
        if branch.index_dtype == FP8_DTYPE:  # the FP8 ranking of msa.select_blocks: on the rounded vectors
            index_q, index_k = rounded(index_q), rounded(index_k)
        results = [msa_attention_suffix(*(x.to(compute) for x in (q[b], k[b], v[b], index_q[b], index_k[b, :, 0])),
                                        block_size=branch.block_size, topk=branch.topk, softmax_scale=scaling)
                   for b in range(q.shape[0])]
        out = torch.stack([r[0] for r in results]).to(q.dtype)
        block_indices = torch.stack([r[1] for r in results])
    if branch.record_block_indices:
        branch.block_indices = block_indices
    return out, None


AttentionInterface.register(ATTENTION, msa_attention_forward)
AttentionMaskInterface.register(ATTENTION, flash_attention_mask)  # None unless there is padding
