"""Properties of MSA that hold for any input (hypothesis), checked through the public ops."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import msa
from helpers import cu_seqlens_of, pack, rand_inputs

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def problems(draw):
    groups = draw(st.integers(1, 3))
    return dict(batch=draw(st.integers(1, 2)), seqlen=draw(st.integers(1, 40)), groups=groups,
                heads=groups * draw(st.integers(1, 3)), head_dim=draw(st.integers(1, 6)),
                index_dim=draw(st.integers(1, 6)), block_size=draw(st.sampled_from([1, 2, 4, 8, 16])),
                topk=draw(st.integers(1, 6)), seed=draw(st.integers(0, 2**31)))


def inputs_of(p, dtype=torch.float64):
    return rand_inputs(p["batch"], p["seqlen"], p["heads"], p["groups"], p["head_dim"], p["index_dim"], dtype, p["seed"])


@SETTINGS
@given(problems())
def test_selection_is_local_causal_distinct_and_full(p):
    *_, index_q, index_k = inputs_of(p)
    blocks = msa.select_blocks(index_q, index_k, block_size=p["block_size"], topk=p["topk"]).long()
    local = (torch.arange(p["seqlen"]) // p["block_size"])[None, :, None, None]
    assert (blocks == local).any(-1).all(), "the local block is always selected"
    assert (blocks <= local).all(), "no block after the local one"
    assert (blocks >= -1).all()
    ordered = blocks.sort(-1).values
    assert not ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any(), "distinct"
    expected_count = torch.clamp(local + 1, max=p["topk"]).expand(blocks.shape[:-1] + (1,))[..., 0]
    assert torch.equal((blocks >= 0).sum(-1), expected_count), "min(topk, visible blocks) blocks"


@SETTINGS
@given(problems())
def test_msa_equals_dense_when_topk_covers_all_blocks(p):
    q, k, v, index_q, index_k = inputs_of(p)
    topk = math.ceil(p["seqlen"] / p["block_size"])
    blocks = msa.select_blocks(index_q, index_k, block_size=p["block_size"], topk=topk)
    out, lse = msa.sparse_attention(q, k, v, blocks, block_size=p["block_size"], return_lse=True)
    dense_out, dense_lse = msa.dense_attention(q, k, v, return_lse=True)
    torch.testing.assert_close(out, dense_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, dense_lse, rtol=1e-6, atol=1e-6)  # lse is float32


@SETTINGS
@given(problems(), st.lists(st.integers(0, 40), min_size=1, max_size=3))
def test_varlen_equals_per_sequence_batched(p, seqlens):
    seqlens = [min(n, p["seqlen"]) for n in seqlens]
    p = dict(p, batch=len(seqlens))
    q, k, v, index_q, index_k = inputs_of(p)
    cu_seqlens = cu_seqlens_of(seqlens)
    size = dict(block_size=p["block_size"])
    packed = [pack(x, seqlens) for x in (q, k, v, index_q, index_k)]
    blocks = msa.select_blocks(packed[3], packed[4], topk=p["topk"], cu_seqlens=cu_seqlens, **size)
    out = msa.sparse_attention(*packed[:3], blocks, cu_seqlens=cu_seqlens, **size)
    kl = msa.index_kl_loss(packed[0], packed[1], packed[3], packed[4], blocks, cu_seqlens=cu_seqlens, **size)
    dense = msa.dense_attention(*packed[:3], cu_seqlens=cu_seqlens)
    kl_sum = 0.0
    for b, n in enumerate(seqlens):
        one = [x[b : b + 1, :n] for x in (q, k, v, index_q, index_k)]
        start = sum(seqlens[:b])
        one_blocks = msa.select_blocks(one[3], one[4], topk=p["topk"], **size)
        assert torch.equal(blocks[start : start + n], one_blocks[0])
        torch.testing.assert_close(out[start : start + n], msa.sparse_attention(*one[:3], one_blocks, **size)[0])
        torch.testing.assert_close(dense[start : start + n], msa.dense_attention(*one[:3])[0])
        if n:
            kl_sum += msa.index_kl_loss(one[0], one[1], one[3], one[4], one_blocks, **size).item() * n * p["groups"]
    assert kl.item() * max(1, sum(seqlens)) * p["groups"] == pytest.approx(kl_sum, rel=1e-9, abs=1e-12)


@SETTINGS
@given(problems())
def test_kl_loss_is_nonnegative(p):
    q, k, _, index_q, index_k = inputs_of(p)
    blocks = msa.select_blocks(index_q, index_k, block_size=p["block_size"], topk=p["topk"])
    assert msa.index_kl_loss(q, k, index_q, index_k, blocks, block_size=p["block_size"]).item() >= 0


@SETTINGS
@given(problems())
def test_kl_loss_is_zero_when_student_equals_teacher(p):
    """One head per group and index projections equal to q, k: the student is the teacher."""
    p = dict(p, groups=1, heads=1, index_dim=p["head_dim"])
    q, k, _, _, _ = inputs_of(p)
    blocks = msa.select_blocks(q, k, block_size=p["block_size"], topk=p["topk"])
    loss = msa.index_kl_loss(q, k, q, k, blocks, block_size=p["block_size"])
    assert abs(loss.item()) < 1e-12
