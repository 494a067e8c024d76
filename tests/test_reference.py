"""msa.reference against brute-force loops over single queries, on tiny shapes."""

import math

import pytest
import torch

from helpers import rand_inputs
from msa import reference

# (batch, seqlen, heads, groups, head_dim, index_dim, block_size, topk)
SHAPES = [(1, 19, 2, 1, 4, 3, 4, 3), (2, 23, 4, 2, 5, 4, 4, 2), (1, 17, 6, 3, 3, 2, 2, 5), (1, 9, 2, 2, 4, 4, 8, 1)]


def brute_selection(index_q, index_k, block_size, topk):
    """Python-loop Top-k per (batch, query, group): a set of block ids."""
    batch, seqlen, groups, index_dim = index_q.shape
    selection = {}
    for b in range(batch):
        for i in range(seqlen):
            for g in range(groups):
                local = i // block_size
                scores = {}
                for j in range(local):
                    scores[j] = max(index_dim**-0.5 * float(index_q[b, i, g] @ index_k[b, t, 0])
                                    for t in range(j * block_size, (j + 1) * block_size))
                best = sorted(scores, key=scores.get, reverse=True)[: topk - 1]
                selection[b, i, g] = {local, *best}
    return selection


def brute_attention(q, k, v, allowed):
    """``allowed(b, i, g)`` -> list of key positions; returns out, lse."""
    batch, seqlen, heads, dim = q.shape
    groups = k.shape[2]
    out, lse = torch.zeros_like(q), torch.zeros(batch, seqlen, heads, dtype=q.dtype)
    for b in range(batch):
        for i in range(seqlen):
            for h in range(heads):
                g = h // (heads // groups)
                keys = allowed(b, i, g)
                logits = torch.stack([dim**-0.5 * (q[b, i, h] @ k[b, t, g]) for t in keys])
                lse[b, i, h] = torch.logsumexp(logits, 0)
                out[b, i, h] = sum(w * v[b, t, g] for w, t in zip(torch.softmax(logits, 0), keys))
    return out, lse


def keys_of(block_indices, block_size):
    def allowed(b, i, g):
        blocks = {int(j) for j in block_indices[b, i, g] if j >= 0}
        return [t for t in range(i + 1) if t // block_size in blocks]

    return allowed


@pytest.mark.parametrize("shape", SHAPES)
def test_select_blocks_matches_brute_force(shape):
    batch, seqlen, heads, groups, head_dim, index_dim, block_size, topk = shape
    *_, index_q, index_k = rand_inputs(batch, seqlen, heads, groups, head_dim, index_dim, seed=1)
    block_indices, lse = reference.select_blocks(index_q, index_k, block_size=block_size, topk=topk, return_lse=True)
    assert block_indices.dtype == torch.int32 and block_indices.shape == (batch, seqlen, groups, topk)
    expected = brute_selection(index_q, index_k, block_size, topk)
    allowed = keys_of(block_indices, block_size)
    for (b, i, g), blocks in expected.items():
        row = [int(j) for j in block_indices[b, i, g]]
        assert {j for j in row if j >= 0} == blocks
        assert row.count(-1) == topk - len(blocks)
        logits = torch.stack([index_dim**-0.5 * (index_q[b, i, g] @ index_k[b, t, 0]) for t in allowed(b, i, g)])
        assert lse[b, i, g].item() == pytest.approx(torch.logsumexp(logits, 0).item(), abs=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_attention_matches_brute_force(shape):
    batch, seqlen, heads, groups, head_dim, index_dim, block_size, topk = shape
    q, k, v, index_q, index_k = rand_inputs(batch, seqlen, heads, groups, head_dim, index_dim, seed=2)
    block_indices = reference.select_blocks(index_q, index_k, block_size=block_size, topk=topk)
    out, lse = reference.sparse_attention(q, k, v, block_indices, block_size=block_size, return_lse=True)
    expected_out, expected_lse = brute_attention(q, k, v, keys_of(block_indices, block_size))
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_dense_attention_matches_brute_force(shape):
    batch, seqlen, heads, groups, head_dim, index_dim, _, _ = shape
    q, k, v, _, _ = rand_inputs(batch, seqlen, heads, groups, head_dim, index_dim, seed=3)
    out, lse = reference.dense_attention(q, k, v, return_lse=True)
    expected_out, expected_lse = brute_attention(q, k, v, lambda b, i, g: list(range(i + 1)))
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_index_kl_loss_matches_brute_force(shape):
    batch, seqlen, heads, groups, head_dim, index_dim, block_size, topk = shape
    q, k, _, index_q, index_k = rand_inputs(batch, seqlen, heads, groups, head_dim, index_dim, seed=4)
    block_indices = reference.select_blocks(index_q, index_k, block_size=block_size, topk=topk)
    allowed = keys_of(block_indices, block_size)
    total = 0.0
    for b in range(batch):
        for i in range(seqlen):
            for g in range(groups):
                keys = allowed(b, i, g)
                heads_of_g = range(g * heads // groups, (g + 1) * heads // groups)
                teacher = sum(torch.softmax(torch.stack([head_dim**-0.5 * (q[b, i, h] @ k[b, t, g]) for t in keys]), 0)
                              for h in heads_of_g) / len(heads_of_g)
                student = torch.softmax(torch.stack([index_dim**-0.5 * (index_q[b, i, g] @ index_k[b, t, 0])
                                                     for t in keys]), 0)
                total += float((teacher * (teacher / student).log()).sum())
    loss = reference.index_kl_loss(q, k, index_q, index_k, block_indices, block_size=block_size)
    assert loss.item() == pytest.approx(total / (batch * seqlen * groups), rel=1e-10)


def test_reference_chunks_long_sequences(monkeypatch):
    """Chunking over queries must not change results."""
    q, k, v, index_q, index_k = rand_inputs(1, 70, 4, 2, 8, 8, seed=5)
    whole_blocks = reference.select_blocks(index_q, index_k, block_size=8, topk=3)
    whole = reference.sparse_attention(q, k, v, whole_blocks, block_size=8)
    whole_kl = reference.index_kl_loss(q, k, index_q, index_k, whole_blocks, block_size=8)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 1000)  # a few queries per chunk
    blocks = reference.select_blocks(index_q, index_k, block_size=8, topk=3)
    assert torch.equal(blocks.sort(-1).values, whole_blocks.sort(-1).values)
    torch.testing.assert_close(reference.sparse_attention(q, k, v, blocks, block_size=8), whole)
    torch.testing.assert_close(reference.index_kl_loss(q, k, index_q, index_k, blocks, block_size=8), whole_kl)


def test_masked_softmax_empty_rows_are_zero_without_nan():
    logits = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 5, [False] * 5, [True, False, True, False, False]])
    probs, lse = reference.masked_softmax(logits, mask)
    assert torch.equal(probs[1], torch.zeros(5, dtype=torch.float64)) and lse[1] == -math.inf
    (probs * torch.randn_like(probs)).sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_queries", [1, 4])
def test_suffix_attention_equals_the_last_rows_of_the_whole_sequence(shape, n_queries):
    q, k, v, index_q, index_k = rand_inputs(*shape[:6], seed=8)
    block_size, topk = shape[6], shape[7]
    blocks = reference.select_blocks(index_q, index_k, block_size=block_size, topk=topk)
    out = reference.sparse_attention(q, k, v, blocks, block_size=block_size)
    last = slice(q.shape[1] - n_queries, None)
    suffix_out, suffix_blocks = reference.msa_attention_suffix(
        q[0, last], k[0], v[0], index_q[0, last], index_k[0, :, 0], block_size=block_size, topk=topk)
    assert torch.equal(suffix_blocks.sort(-1).values, blocks[0, last].long().sort(-1).values)
    assert torch.allclose(suffix_out, out[0, last], atol=1e-12)
