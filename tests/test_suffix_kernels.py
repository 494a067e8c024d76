"""The Triton training kernels on queries that are the suffix of longer key sequences (flash-attn's bottom-right
alignment: query i of a sequence sits at key position Sk - Sq + i, block ids count key blocks).

select_blocks must equal the PyTorch path's selection exactly (ties included), sparse_attention (forward, LSE and
gradients) and index_kl_loss (value and gradients) the float64 reference, in the batched layout (Sq = 1 and Sq not a
multiple of the block) and the packed one (prefixes of different lengths, a sequence whose queries are all its keys,
one without queries); outputs poisoned, and none of the calls may fall back to the PyTorch path. Under the
interpreter without a GPU: tiny shapes.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import cu_seqlens_of, pack, poison_allocations, rand_inputs, rel_err

import msa
from msa import reference
from msa.ops import backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE, TOPK, HEADS, GROUPS, HEAD_DIM, INDEX_DIM = 16, 3, 4, 2, 16, 32
# (keys, queries) per sequence of the packed layout: prefixes of 65, 0 and 38 keys, and a sequence without queries
PACKED = [(70, 5), (17, 17), (16, 0), (40, 2)]
# (batch, keys, queries) of the batched layout
BATCHED = {"batched Sq=11": (1, 70, 11), "batched Sq=1": (2, 70, 1)}
LAYOUTS = [*BATCHED, "packed"]
# the attention and KL kernels run in bf16 on a GPU and in float32 under the interpreter, against the float64
# reference (gradients: twice the bound in bf16, as tests/test_kernels.py); the selection runs in float32 everywhere
# (it must equal the PyTorch path's bit for bit)
DTYPE, BOUND, GRAD_BOUND = (torch.bfloat16, 2e-2, 4e-2) if DEVICE == "cuda" else (torch.float32, 1e-5, 1e-5)


def suffix_inputs(layout: str, seed: int, dtype=torch.float32):
    """``q, k, v, index_q, index_k`` (the queries the last of their keys) and the ops' varlen arguments."""
    if layout in BATCHED:
        batch, n_keys, n_queries = BATCHED[layout]
        q, k, v, index_q, index_k = rand_inputs(batch, n_keys, HEADS, GROUPS, HEAD_DIM, INDEX_DIM, seed=seed)
        inputs, varlen = (q[:, -n_queries:], k, v, index_q[:, -n_queries:], index_k), {}
    else:
        key_lens, query_lens = (list(x) for x in zip(*PACKED))
        q, k, v, index_q, index_k = rand_inputs(len(PACKED), max(key_lens), HEADS, GROUPS, HEAD_DIM, INDEX_DIM,
                                                seed=seed)
        queries = [slice(n - m, n) for n, m in PACKED]
        inputs = (torch.cat([q[b, rows] for b, rows in enumerate(queries)]), *(pack(x, key_lens) for x in (k, v)),
                  torch.cat([index_q[b, rows] for b, rows in enumerate(queries)]), pack(index_k, key_lens))
        varlen = dict(cu_seqlens_q=cu_seqlens_of(query_lens, DEVICE), cu_seqlens_k=cu_seqlens_of(key_lens, DEVICE),
                      max_seqlen_q=max(query_lens), max_seqlen_k=max(key_lens))
    return tuple(x.to(DEVICE, dtype) for x in inputs), varlen


@pytest.fixture
def triton_backend(monkeypatch):
    """The Triton backend with poisoned allocations; a fallback to the PyTorch path fails the test (its one-time
    warnings forgotten, so that they are issued again). The atomic passes walk their lists in 2 parts instead of 8:
    fewer programs to interpret."""
    from msa import kernels

    monkeypatch.setenv("MSA_BACKEND", "triton")
    monkeypatch.setattr(backend, "_warned", set())
    poison_allocations(monkeypatch)
    configs = dict(sparse_attention_bwd=kernels.SparseBackwardConfig(list_parts=2),
                   **dict.fromkeys(("index_kl_fwd", "index_kl_fwd_bwd", "index_kl_bwd"),
                                   kernels.IndexKLConfig(list_parts=2)))
    for launcher, config in configs.items():
        monkeypatch.setattr(kernels, launcher, functools.partial(getattr(kernels, launcher), config=config))


def reference_selection(index_q, index_k, varlen):
    options = {name: value for name, value in varlen.items() if name.startswith("cu_seqlens")}
    return reference.select_blocks(index_q.double(), index_k.double(), block_size=BLOCK_SIZE, topk=TOPK, **options)


@pytest.mark.filterwarnings("error:.*using the PyTorch path")
@pytest.mark.parametrize("kind", ["random", "zeros"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_select_blocks_of_suffix_queries(layout, kind, triton_backend, monkeypatch):
    """The Triton selection and its LSE are the PyTorch path's, bit for bit: the reference layout, ties (all-zero
    index vectors) to the lower block."""
    (*_, index_q, index_k), varlen = suffix_inputs(layout, seed=1)
    if kind == "zeros":
        index_q, index_k = torch.zeros_like(index_q), torch.zeros_like(index_k)
    options = dict(block_size=BLOCK_SIZE, topk=TOPK, return_lse=True, **varlen)
    blocks, lse = msa.select_blocks(index_q, index_k, **options)
    monkeypatch.setenv("MSA_BACKEND", "torch")
    torch_blocks, torch_lse = msa.select_blocks(index_q, index_k, **options)
    assert blocks.dtype == torch.int32 and torch.equal(blocks, torch_blocks)
    assert torch.equal(blocks.long(), reference_selection(index_q, index_k, varlen).long())
    assert rel_err(lse, torch_lse) < 1e-5


@pytest.mark.filterwarnings("error:.*using the PyTorch path")
@pytest.mark.parametrize("schedule, deterministic", [("query", True), ("kv", False)],
                         ids=["query-outer forward, deterministic backward", "kv-outer forward, atomic backward"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sparse_attention_of_suffix_queries(layout, schedule, deterministic, triton_backend, monkeypatch):
    from msa import kernels

    monkeypatch.setattr(kernels, "sparse_attention_fwd",
                        functools.partial(kernels.sparse_attention_fwd, schedule=schedule))
    (q, k, v, index_q, index_k), varlen = suffix_inputs(layout, seed=2, dtype=DTYPE)
    blocks = reference_selection(index_q, index_k, varlen)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out, lse = msa.sparse_attention(*leaves, blocks, block_size=BLOCK_SIZE, return_lse=True,
                                    deterministic=deterministic, **varlen)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)

    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    options = {name: value for name, value in varlen.items() if name.startswith("cu_seqlens")}
    ref_out, ref_lse = reference.sparse_attention(*ref_leaves, blocks, block_size=BLOCK_SIZE, return_lse=True,
                                                  **options)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad_out.double())
    assert rel_err(out, ref_out) < BOUND and rel_err(lse, ref_lse) < BOUND
    for name, grad, ref in zip("qkv", grads, ref_grads):
        assert rel_err(grad, ref) < GRAD_BOUND, f"d{name}"


@pytest.mark.filterwarnings("error:.*using the PyTorch path")
@pytest.mark.parametrize("deterministic", [False, True], ids=["fused", "deterministic"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_index_kl_loss_of_suffix_queries(layout, deterministic, triton_backend):
    """The loss and its gradients in index_q and index_k: the fused pass, or the loss pass and the deterministic
    backward."""
    (q, k, v, index_q, index_k), varlen = suffix_inputs(layout, seed=3, dtype=DTYPE)
    blocks = reference_selection(index_q, index_k, varlen)
    leaves = [x.requires_grad_() for x in (index_q, index_k)]
    loss = msa.index_kl_loss(q, k, *leaves, blocks, block_size=BLOCK_SIZE, deterministic=deterministic, **varlen)
    grads = torch.autograd.grad(loss, leaves)

    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    options = {name: value for name, value in varlen.items() if name.startswith("cu_seqlens")}
    ref_loss = reference.index_kl_loss(q.double(), k.double(), *ref_leaves, blocks, block_size=BLOCK_SIZE,
                                       **options)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    assert loss.dtype == torch.float32 and rel_err(loss, ref_loss) < BOUND
    for name, grad, ref in zip(("index_q", "index_k"), grads, ref_grads):
        assert rel_err(grad, ref) < GRAD_BOUND, f"d {name}"
