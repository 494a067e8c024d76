"""The selection contract and queries as the suffix of the keys, from their definitions.

The official MSA definitions (the float64 references published with the
paper's kernels), restated here in plain loops:

- count = min(topk, local + 1) valid entries per (query, group): the count - 1
  earlier blocks of highest max-pooled index logit, in descending score, equal
  scores to the lower block id; the local block in the last valid slot; -1 after.
- Queries may be the last Sq of Sk positions (bottom-right alignment): query i
  sits at position Sk - Sq + i and block ids count key blocks.

Backends held to the contract here: the float64 reference and the PyTorch
path of the public ops, compared as tensors (not as sets).
"""

import math

import pytest
import torch

import msa
from helpers import cu_seqlens_of, pack, rand_inputs, rel_err
from msa import reference


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
    """Index queries ``[1, S, G, Di]`` and keys ``[1, S, 1, Di]``: random, all zero (every score ties), or small
    integers with every key block a copy of the first (scores repeat from block to block)."""
    *_, index_q, index_k = rand_inputs(1, seqlen, 2, groups, 2, index_dim, seed=seed)
    if kind == "zeros":
        return torch.zeros_like(index_q), torch.zeros_like(index_k)
    if kind == "repeated":
        block = index_k[:, :8].round()
        return index_q.round(), block.repeat(1, math.ceil(seqlen / 8), 1, 1)[:, :seqlen]
    return index_q, index_k


@pytest.mark.parametrize("kind", ["random", "zeros", "repeated"])
@pytest.mark.parametrize("seqlen, block_size, topk", [(70, 8, 4), (45, 4, 16), (33, 16, 3)])
def test_selection_is_the_official_layout(kind, seqlen, block_size, topk, monkeypatch):
    index_q, index_k = index_vectors(kind, seqlen, 2, 8, seed=1)
    expected = official_selection(index_q[0], index_k[0, :, 0], block_size, topk, 8**-0.5)
    assert torch.equal(reference.select_blocks(index_q, index_k, block_size=block_size, topk=topk)[0].long(),
                       expected)
    monkeypatch.setenv("MSA_BACKEND", "torch")
    assert torch.equal(msa.select_blocks(index_q, index_k, block_size=block_size, topk=topk)[0].long(), expected)


@pytest.mark.parametrize("kind", ["random", "zeros"])
def test_suffix_selection_is_the_official_layout(kind):
    index_q, index_k = index_vectors(kind, 50, 2, 8, seed=2)
    n_queries = 13
    blocks = reference.select_blocks(index_q[:, -n_queries:], index_k, block_size=8, topk=3)
    expected = official_selection(index_q[0, -n_queries:], index_k[0, :, 0], 8, 3, 8**-0.5, offset=50 - n_queries)
    assert torch.equal(blocks[0].long(), expected)


def chunked_run(q, k, v, index_q, index_k, bounds, block_size, topk):
    """The sequence as consecutive query chunks ``bounds`` against the growing key prefix: the selection, output,
    LSE and the KL loss summed over rows, each chunk run with queries as the suffix of its keys."""
    blocks, outs, lses, kl_sum = [], [], [], 0.0
    for start, end in zip(bounds[:-1], bounds[1:]):
        keys = slice(0, end)
        queries = slice(start, end)
        chunk_blocks = reference.select_blocks(index_q[:, queries], index_k[:, keys], block_size=block_size,
                                               topk=topk)
        out, lse = reference.sparse_attention(q[:, queries], k[:, keys], v[:, keys], chunk_blocks,
                                              block_size=block_size, return_lse=True)
        kl = reference.index_kl_loss(q[:, queries], k[:, keys], index_q[:, queries], index_k[:, keys], chunk_blocks,
                                     block_size=block_size)
        blocks.append(chunk_blocks)
        outs.append(out)
        lses.append(lse)
        kl_sum = kl_sum + kl * chunk_blocks.shape[:-1].numel()
    return torch.cat(blocks, 1), torch.cat(outs, 1), torch.cat(lses, 1), kl_sum


def test_query_chunks_against_the_key_prefix_equal_the_whole_sequence():
    seqlen, block_size, topk = 61, 8, 3
    leaves = [x.requires_grad_() for x in rand_inputs(2, seqlen, 4, 2, 8, 8, seed=3)]
    blocks, out, lse, kl_sum = chunked_run(*leaves, [0, 1, 17, 40, 41, seqlen], block_size, topk)

    whole_leaves = [x.detach().clone().requires_grad_() for x in leaves]
    whole_blocks = reference.select_blocks(*whole_leaves[3:], block_size=block_size, topk=topk)
    whole_out, whole_lse = reference.sparse_attention(*whole_leaves[:3], whole_blocks, block_size=block_size,
                                                      return_lse=True)
    whole_kl = reference.index_kl_loss(*whole_leaves[:2], *whole_leaves[3:], whole_blocks, block_size=block_size)
    assert torch.equal(blocks, whole_blocks)
    assert rel_err(out, whole_out) < 1e-13 and rel_err(lse, whole_lse) < 1e-13
    assert rel_err(kl_sum, whole_kl * whole_blocks.shape[:-1].numel()) < 1e-13

    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad((out * grad_out).sum() + kl_sum, leaves)
    whole_grads = torch.autograd.grad((whole_out * grad_out).sum() + whole_kl * whole_blocks.shape[:-1].numel(),
                                      whole_leaves)
    for grad, whole_grad in zip(grads, whole_grads):
        assert rel_err(grad, whole_grad) < 1e-12


def test_packed_suffix_queries_equal_batched():
    """cu_seqlens_q / cu_seqlens_k: each sequence's queries are the suffix of its keys."""
    key_lens, query_lens = [30, 19, 7], [5, 19, 1]
    q, k, v, index_q, index_k = rand_inputs(3, 30, 4, 2, 8, 8, seed=4)
    suffix = [slice(n - m, n) for n, m in zip(key_lens, query_lens)]
    packed_q = [torch.cat([x[b, rows] for b, rows in enumerate(suffix)]) for x in (q, index_q)]
    packed_k = [pack(x, key_lens) for x in (k, v, index_k)]
    varlen = dict(cu_seqlens_q=cu_seqlens_of(query_lens), cu_seqlens_k=cu_seqlens_of(key_lens), block_size=8)
    blocks = reference.select_blocks(packed_q[1], packed_k[2], topk=2, **varlen)
    out = reference.sparse_attention(packed_q[0], *packed_k[:2], blocks, **varlen)
    kl = reference.index_kl_loss(packed_q[0], packed_k[0], packed_q[1], packed_k[2], blocks, **varlen)
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
