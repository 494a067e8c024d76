"""The selection contract and queries as the suffix of the keys, from their definitions.

The official MSA definitions (the float64 references published with the
paper's kernels), restated here in plain loops:

- count = min(topk, local + 1) valid entries per (query, group): the count - 1
  earlier blocks of highest max-pooled index logit, in descending score, equal
  scores to the lower block id; the local block in the last valid slot; -1 after.
- Queries may be the last Sq of Sk positions (bottom-right alignment): query i
  sits at position Sk - Sq + i and block ids count key blocks.

Backends held to the contract here, compared as tensors (not as sets): the
float64 reference, the public ops' PyTorch path and Triton kernels (plain and
narrowed Top-k; fp32, fp16 and FP8 index vectors), and both paths of
PagedSparseAttention (prefill chunks and decode steps over a paged cache).
"""

import functools
import math

import pytest
import torch

import msa
from helpers import assert_selection_matches, cu_seqlens_of, pack, poison_allocations, rand_inputs, rel_err, slow_except
from msa import reference
from msa.fp8 import FP8_DTYPE, rounded
from msa.inference import PagedKVCache, PagedSparseAttention

KINDS = ["random", "zeros", "repeated"]
INDEX_DIM = 32  # FP8 tensor-core products on GPUs take index head dims of 32 and more
# (seqlen, block_size, topk): shapes the Triton kernels take; the last has rows of up to 18 earlier blocks, which the
# Triton Top-k narrows to their candidates (from 16 blocks on, as the Triton tests set it)
SHAPES = [(70, 16, 4), (100, 16, 9), (45, 32, 3), (300, 16, 5)]
# (dtype of the index vectors, index_dtype of the ranking)
RANKINGS = [(torch.float32, None), (torch.float16, None), (torch.float16, FP8_DTYPE)]
# the Triton backend's tensors: compiled on a GPU, interpreted on the CPU
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On a GPU the kernels' products of random vectors round differently from float64 (TF32 for float32 inputs, Hopper's
# FP8 accumulation): near-ties may rank apart there (helpers.assert_selection_matches bounds them). The interpreter,
# and on a GPU the all-tied and repeated integer vectors (exact in every product), must give the layout exactly.
GPU_SELECTION_TOL = 1e-2


def official_selection(index_q, index_k, block_size, topk, scale, offset=0):
    """Loops: ``index_q`` ``[Sq, G, Di]`` at positions ``offset ..``, ``index_k`` ``[Sk, Di]`` -> ``[Sq, G, topk]``."""
    n_queries, n_groups, _ = index_q.shape
    out = torch.full((n_queries, n_groups, topk), -1, dtype=torch.int64)
    for i in range(n_queries):
        position = offset + i
        local = position // block_size
        count = min(topk, local + 1)
        for g in range(n_groups):
            logits = [scale * float(index_q[i, g] @ index_k[t]) for t in range(local * block_size)]
            scores = [max(logits[j * block_size:(j + 1) * block_size]) for j in range(local)]
            earlier = sorted(range(local), key=lambda j: (-scores[j], j))[:count - 1]
            out[i, g, :count] = torch.tensor(earlier + [local])
    return out


def index_vectors(kind, seqlen, groups, index_dim, seed):
    """Index queries ``[1, S, G, Di]`` and keys ``[1, S, 1, Di]``: random, all zero (every score ties), or
    integers in -2 .. 2 with keys that repeat every 24 positions (blocks of 16 or 32 tokens: every third block
    scores the same) and 2 first in every row (one FP8 scale for all rows, so that FP8 ranking keeps the ties)."""
    *_, index_q, index_k = rand_inputs(1, seqlen, 2, groups, 2, index_dim, seed=seed)
    if kind == "zeros":
        return torch.zeros_like(index_q), torch.zeros_like(index_k)
    if kind == "repeated":
        index_q, index_k = (x.round().clamp(-2, 2) for x in (index_q, index_k[:, :24]))
        index_q[..., 0] = index_k[..., 0] = 2
        return index_q, index_k.repeat(1, math.ceil(seqlen / 24), 1, 1)[:, :seqlen]
    return index_q, index_k


def ranked(x, index_dtype):
    """float64 ``x`` as the selection ranks it: FP8-rounded with ``index_dtype`` FP8 (:mod:`msa.fp8`)."""
    return (rounded(x) if index_dtype == FP8_DTYPE else x).double()


def narrow_from_16_blocks(monkeypatch):
    """The Triton Top-k narrows rows of 16 blocks and more (by default 128) to their candidates."""
    from msa.kernels import indexer

    monkeypatch.setattr(indexer, "top_blocks_config", functools.partial(indexer.top_blocks_config, narrow_from=16))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seqlen, block_size, topk", SHAPES)
@pytest.mark.parametrize("index_dtype", [None, FP8_DTYPE])
def test_selection_is_the_official_layout(kind, seqlen, block_size, topk, index_dtype, monkeypatch):
    index_q, index_k = index_vectors(kind, seqlen, 2, INDEX_DIM, seed=1)
    expected = official_selection(ranked(index_q, index_dtype)[0], ranked(index_k, index_dtype)[0, :, 0], block_size,
                                  topk, INDEX_DIM**-0.5)
    options = dict(block_size=block_size, topk=topk, index_dtype=index_dtype)
    assert torch.equal(reference.select_blocks(index_q, index_k, **options)[0].long(), expected)
    monkeypatch.setenv("MSA_BACKEND", "torch")
    assert torch.equal(msa.select_blocks(index_q, index_k, **options)[0].long(), expected)


@pytest.mark.filterwarnings("error:.*using the PyTorch path")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", slow_except(SHAPES, -1))
@pytest.mark.parametrize("dtype, index_dtype", RANKINGS)
def test_triton_selection_is_the_official_layout(kind, shape, dtype, index_dtype, monkeypatch):
    """The Triton kernels (under the interpreter without a GPU), outputs poisoned: the official selection of
    the vectors they rank (the fp16 ones, or their FP8 rounding)."""
    seqlen, block_size, topk = shape
    monkeypatch.setenv("MSA_BACKEND", "triton")
    poison_allocations(monkeypatch)
    narrow_from_16_blocks(monkeypatch)
    index_q, index_k = (x.to(TRITON_DEVICE, dtype) for x in index_vectors(kind, seqlen, 2, INDEX_DIM, seed=1))
    expected = official_selection(ranked(index_q, index_dtype)[0].cpu(), ranked(index_k, index_dtype)[0, :, 0].cpu(),
                                  block_size, topk, INDEX_DIM**-0.5)
    blocks = msa.select_blocks(index_q, index_k, block_size=block_size, topk=topk, index_dtype=index_dtype)
    if kind == "random" and TRITON_DEVICE == "cuda":
        assert_selection_matches(blocks.cpu(), ranked(index_q, index_dtype).cpu(), ranked(index_k, index_dtype).cpu(),
                                 block_size, topk, tol=GPU_SELECTION_TOL)
    else:
        assert torch.equal(blocks[0].long().cpu(), expected)


@pytest.mark.filterwarnings("error:.*using the PyTorch path")
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype, index_dtype", RANKINGS)
@pytest.mark.parametrize("topk", [3, 16])
def test_paged_selection_is_the_reference_layout(backend, kind, dtype, index_dtype, topk, monkeypatch):
    """PagedSparseAttention's selection of two prefill chunks, then decode steps of 1, 3, 1 and 6 tokens, over
    a cache of 4 pages per request (topk 16: 4 slots): the reference selection of each step's queries as the
    suffix of the keys so far, outputs poisoned."""
    monkeypatch.setenv("MSA_BACKEND", backend)
    poison_allocations(monkeypatch)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    seqlen, block_size, groups, bounds = 56, 16, 2, [0, 20, 45, 46, 49, 50, 56]
    q, k, v, *_ = (x[0].to(device, dtype) for x in rand_inputs(1, seqlen, 4, groups, 16, INDEX_DIM, seed=5))
    index_q, index_k = (x.to(device, dtype) for x in index_vectors(kind, seqlen, groups, INDEX_DIM, seed=5))
    pages = math.ceil(seqlen / block_size)
    cache = PagedKVCache(num_layers=1, num_pages=pages, block_size=block_size, num_kv_heads=groups, head_dim=16,
                         index_head_dim=INDEX_DIM, max_requests=1, dtype=dtype, index_dtype=index_dtype, device=device)
    attention = PagedSparseAttention(cache, num_heads=4, topk=topk)
    request = cache.add_request()
    for start, end in zip(bounds[:-1], bounds[1:]):
        attention.plan([request], [end - start])
        assert attention.triton_path == (backend == "triton")
        _, blocks = attention.run(0, q[start:end], k[start:end], v[start:end], index_q[0, start:end],
                                  index_k[0, start:end], return_block_indices=True)
        expected = reference.select_blocks(ranked(index_q[:, start:end], index_dtype),
                                           ranked(index_k[:, :end], index_dtype), block_size=block_size, topk=topk)
        assert blocks.dtype == torch.int64 and torch.equal(blocks, expected[0, :, :, :pages].long())
        assert (expected[..., pages:] == -1).all()


@pytest.mark.parametrize("kind", ["random", "zeros"])
def test_suffix_selection_is_the_official_layout(kind):
    index_q, index_k = index_vectors(kind, 50, 2, 8, seed=2)
    n_queries = 13
    blocks = reference.select_blocks(index_q[:, -n_queries:], index_k, block_size=8, topk=3)
    expected = official_selection(index_q[0, -n_queries:], index_k[0, :, 0], 8, 3, 8**-0.5, offset=50 - n_queries)
    assert torch.equal(blocks[0].long(), expected)


def chunked_run(api, q, k, v, index_q, index_k, bounds, block_size, topk):
    """The sequence as consecutive query chunks ``bounds`` against the growing key prefix: the selection, output,
    LSE and the KL loss summed over rows, each chunk run with queries as the suffix of its keys (``api``: the
    reference or the public ops)."""
    blocks, outs, lses, kl_sum = [], [], [], 0.0
    for start, end in zip(bounds[:-1], bounds[1:]):
        keys = slice(0, end)
        queries = slice(start, end)
        chunk_blocks = api.select_blocks(index_q[:, queries], index_k[:, keys], block_size=block_size, topk=topk)
        out, lse = api.sparse_attention(q[:, queries], k[:, keys], v[:, keys], chunk_blocks, block_size=block_size,
                                        return_lse=True)
        kl = api.index_kl_loss(q[:, queries], k[:, keys], index_q[:, queries], index_k[:, keys], chunk_blocks,
                               block_size=block_size)
        blocks.append(chunk_blocks)
        outs.append(out)
        lses.append(lse)
        kl_sum = kl_sum + kl * chunk_blocks.shape[:-1].numel()
    return torch.cat(blocks, 1), torch.cat(outs, 1), torch.cat(lses, 1), kl_sum


@pytest.mark.parametrize("api", [reference, msa], ids=["reference", "ops"])
def test_query_chunks_against_the_key_prefix_equal_the_whole_sequence(api, monkeypatch):
    monkeypatch.setenv("MSA_BACKEND", "torch")
    seqlen, block_size, topk = 61, 8, 3
    leaves = [x.requires_grad_() for x in rand_inputs(2, seqlen, 4, 2, 8, 8, seed=3)]
    blocks, out, lse, kl_sum = chunked_run(api, *leaves, [0, 1, 17, 40, 41, seqlen], block_size, topk)

    whole_leaves = [x.detach().clone().requires_grad_() for x in leaves]
    whole_blocks = reference.select_blocks(*whole_leaves[3:], block_size=block_size, topk=topk)
    whole_out, whole_lse = reference.sparse_attention(*whole_leaves[:3], whole_blocks, block_size=block_size,
                                                      return_lse=True)
    whole_kl = reference.index_kl_loss(*whole_leaves[:2], *whole_leaves[3:], whole_blocks, block_size=block_size)
    assert torch.equal(blocks, whole_blocks)
    assert rel_err(out, whole_out) < 1e-13 and rel_err(lse, whole_lse) < 1e-7  # the ops return a float32 LSE
    assert rel_err(kl_sum, whole_kl * whole_blocks.shape[:-1].numel()) < 1e-13

    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad((out * grad_out).sum() + kl_sum, leaves)
    whole_grads = torch.autograd.grad((whole_out * grad_out).sum() + whole_kl * whole_blocks.shape[:-1].numel(),
                                      whole_leaves)
    for grad, whole_grad in zip(grads, whole_grads):
        assert rel_err(grad, whole_grad) < 1e-12


@pytest.mark.parametrize("api", [reference, msa], ids=["reference", "ops"])
def test_packed_suffix_queries_equal_batched(api, monkeypatch):
    """cu_seqlens_q / cu_seqlens_k: each sequence's queries are the suffix of its keys."""
    monkeypatch.setenv("MSA_BACKEND", "torch")
    key_lens, query_lens = [30, 19, 7], [5, 19, 1]
    q, k, v, index_q, index_k = rand_inputs(3, 30, 4, 2, 8, 8, seed=4)
    suffix = [slice(n - m, n) for n, m in zip(key_lens, query_lens)]
    packed_q = [torch.cat([x[b, rows] for b, rows in enumerate(suffix)]) for x in (q, index_q)]
    packed_k = [pack(x, key_lens) for x in (k, v, index_k)]
    varlen = dict(cu_seqlens_q=cu_seqlens_of(query_lens), cu_seqlens_k=cu_seqlens_of(key_lens), block_size=8)
    blocks = api.select_blocks(packed_q[1], packed_k[2], topk=2, **varlen)
    out = api.sparse_attention(packed_q[0], *packed_k[:2], blocks, **varlen)
    kl = api.index_kl_loss(packed_q[0], packed_k[0], packed_q[1], packed_k[2], blocks, **varlen)
    kl_sum = 0.0
    for b, rows in enumerate(suffix):
        keys = slice(0, key_lens[b])
        one = reference.select_blocks(index_q[b:b + 1, rows], index_k[b:b + 1, keys], block_size=8, topk=2)
        first = sum(query_lens[:b])
        assert torch.equal(blocks[first:first + query_lens[b]], one[0])
        one_out = reference.sparse_attention(q[b:b + 1, rows], k[b:b + 1, keys], v[b:b + 1, keys], one, block_size=8)
        assert rel_err(out[first:first + query_lens[b]], one_out[0]) < 1e-14
        kl_sum += reference.index_kl_loss(q[b:b + 1, rows], k[b:b + 1, keys], index_q[b:b + 1, rows],
                                          index_k[b:b + 1, keys], one, block_size=8) * one[0].shape[:-1].numel()
    assert rel_err(kl * blocks.shape[:-1].numel(), kl_sum) < 1e-13


def test_dense_attention_of_suffix_queries_is_bottom_right_causal():
    q, k, v, _, _ = rand_inputs(2, 30, 4, 2, 8, 8, seed=5)
    whole = reference.dense_attention(q, k, v)
    assert rel_err(msa.dense_attention(q[:, 21:], k, v), whole[:, 21:]) < 1e-13
    packed = msa.dense_attention(torch.cat([q[0, 21:], q[1, 10:]]), torch.cat([k[0], k[1]]), torch.cat([v[0], v[1]]),
                                 cu_seqlens_q=cu_seqlens_of([9, 20]), cu_seqlens_k=cu_seqlens_of([30, 30]))
    assert rel_err(packed, torch.cat([whole[0, 21:], whole[1, 10:]])) < 1e-13


def test_suffix_layouts_get_clear_errors():
    q, k, v, index_q, index_k = rand_inputs(1, 20, 4, 2, 8, 8, seed=6)
    cu = cu_seqlens_of([20])
    with pytest.raises(ValueError, match=r"k must have shape \[B=1, Sk >= S=20"):
        msa.sparse_attention(q, k[:, :10], v[:, :10], torch.zeros(1, 20, 2, 1, dtype=torch.int32), block_size=8)
    with pytest.raises(ValueError, match="cu_seqlens_q and cu_seqlens_k go together"):
        msa.select_blocks(index_q[0], index_k[0], block_size=8, cu_seqlens_q=cu)
    with pytest.raises(ValueError, match="not both"):
        msa.select_blocks(index_q[0], index_k[0], block_size=8, cu_seqlens=cu, cu_seqlens_k=cu)
    with pytest.raises(ValueError, match="at least as many keys"):
        msa.select_blocks(index_q[0], index_k[0, :12], block_size=8, cu_seqlens_q=cu, cu_seqlens_k=cu_seqlens_of([12]))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", KINDS)
def test_top_of_a_wider_selection_is_the_narrower_selection(backend, kind, monkeypatch):
    """Selection.top(k) of a ranked top-K selection equals select_blocks(topk=k): batched, packed (with an empty
    sequence) and with queries as the suffix of the keys."""
    monkeypatch.setenv("MSA_BACKEND", backend)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    rows = [index_vectors(kind, 300, 2, INDEX_DIM, seed=seed) for seed in (7, 8, 9)]
    index_q, index_k = (torch.cat(x).to(device, torch.float32) for x in zip(*rows))
    seqlens = [300, 0, 170]
    packed_q, packed_k = pack(index_q, seqlens), pack(index_k, seqlens)
    cu_seqlens = cu_seqlens_of(seqlens, device)
    cases = [dict(index_q=index_q, index_k=index_k),
             dict(index_q=packed_q, index_k=packed_k, cu_seqlens=cu_seqlens, max_seqlen=300),
             dict(index_q=index_q[:, -45:], index_k=index_k)]
    for inputs in cases:
        wide = msa.select_blocks(**inputs, block_size=16, topk=12, return_selection=True)
        for topk in (1, 3, 5, 12):
            narrow = msa.select_blocks(**inputs, block_size=16, topk=topk)
            assert torch.equal(wide.top(topk).block_indices, narrow)


def test_top_needs_a_ranked_selection_and_a_smaller_topk():
    index_q, index_k = index_vectors("random", 40, 2, 8, seed=8)
    wide = msa.select_blocks(index_q, index_k, block_size=8, topk=4, return_selection=True)
    with pytest.raises(ValueError, match="topk must be an int in \\[1, 4\\]"):
        wide.top(5)
    given = msa.Selection.from_indices(wide.block_indices, block_size=8)
    with pytest.raises(ValueError, match="needs a ranked selection"):
        given.top(2)
