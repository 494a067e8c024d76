"""The public ops: agreement with the float64 reference, gradients, and input validation."""

import math

import pytest
import torch

import msa
from helpers import cu_seqlens_of, rand_inputs, rel_err

SHAPE = dict(batch=2, seqlen=150, heads=4, groups=2, head_dim=16, index_dim=8)


def selection(index_q, index_k, block_size=16, topk=4, **kw):
    return msa.reference.select_blocks(index_q.double(), index_k.double(), block_size=block_size, topk=topk, **kw)


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5),
                                          pytest.param(torch.bfloat16, 1e-2, marks=pytest.mark.slow),
                                          pytest.param(torch.float16, 2e-3, marks=pytest.mark.slow)])
def test_ops_match_reference(dtype, bound):
    inputs = rand_inputs(**SHAPE, dtype=dtype, seed=11)
    q, k, v, index_q, index_k = inputs
    q64, k64, v64, iq64, ik64 = (x.double() for x in inputs)
    blocks = selection(index_q, index_k)
    out, lse = msa.sparse_attention(q, k, v, blocks, block_size=16, return_lse=True)
    ref_out, ref_lse = msa.reference.sparse_attention(q64, k64, v64, blocks, block_size=16, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert rel_err(out, ref_out) < bound and rel_err(lse, ref_lse) < bound
    kl = msa.index_kl_loss(q, k, index_q, index_k, blocks, block_size=16)
    assert rel_err(kl, msa.reference.index_kl_loss(q64, k64, iq64, ik64, blocks, block_size=16)) < bound
    dense = msa.dense_attention(q, k, v)
    assert rel_err(dense, msa.reference.dense_attention(q64, k64, v64)) < bound


def test_select_blocks_op_matches_reference_in_float32():
    *_, index_q, index_k = rand_inputs(**SHAPE, dtype=torch.float32, seed=12)
    blocks, lse = msa.select_blocks(index_q, index_k, block_size=16, topk=4, return_lse=True)
    ref_blocks, ref_lse = selection(index_q, index_k, return_lse=True)
    assert blocks.dtype == torch.int32 and lse.dtype == torch.float32
    assert torch.equal(blocks.sort(-1).values, ref_blocks.sort(-1).values)
    assert rel_err(lse, ref_lse) < 1e-6


def test_sparse_attention_gradients_match_reference():
    q, k, v, index_q, index_k = (x.requires_grad_() for x in rand_inputs(**SHAPE, seed=13))
    blocks = selection(index_q, index_k)
    grad_out = torch.randn_like(q)
    grads = torch.autograd.grad(msa.sparse_attention(q, k, v, blocks, block_size=16), (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(msa.reference.sparse_attention(q, k, v, blocks, block_size=16), (q, k, v), grad_out)
    for grad, ref in zip(grads, ref_grads):
        assert rel_err(grad, ref) < 1e-12


@pytest.mark.slow
def test_gradcheck_sparse_attention():
    q, k, v, index_q, index_k = rand_inputs(1, 21, 4, 2, 3, 3, seed=14)
    blocks = selection(index_q, index_k, block_size=4, topk=3)
    inputs = tuple(x.requires_grad_() for x in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: msa.sparse_attention(q, k, v, blocks, block_size=4), inputs)


@pytest.mark.slow
def test_gradcheck_index_kl_loss_and_teacher_is_detached():
    q, k, _, index_q, index_k = rand_inputs(1, 21, 4, 2, 3, 3, seed=15)
    blocks = selection(index_q, index_k, block_size=4, topk=3)
    index_inputs = tuple(x.requires_grad_() for x in (index_q, index_k))
    q.requires_grad_(), k.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda iq, ik: msa.index_kl_loss(q, k, iq, ik, blocks, block_size=4), index_inputs)
    loss = msa.index_kl_loss(q, k, index_q, index_k, blocks, block_size=4)
    loss.backward()
    assert q.grad is None and k.grad is None, "the teacher must receive no gradient"
    assert index_q.grad.abs().sum() > 0 and index_k.grad.abs().sum() > 0


def test_varlen_with_empty_sequences_and_max_seqlen():
    q, k, v, index_q, index_k = (x[0] for x in rand_inputs(1, 40, 4, 2, 8, 8, seed=16))
    cu_seqlens = cu_seqlens_of([0, 25, 0, 15])
    blocks = msa.select_blocks(index_q, index_k, block_size=8, topk=2, cu_seqlens=cu_seqlens, max_seqlen=25)
    out = msa.sparse_attention(q, k, v, blocks, block_size=8, cu_seqlens=cu_seqlens)
    ref = msa.reference.sparse_attention(q, k, v, blocks, block_size=8, cu_seqlens=cu_seqlens)
    assert rel_err(out, ref) < 1e-12


def test_rows_without_visible_keys_give_zero_and_minus_inf_lse():
    q, k, v, _, _ = rand_inputs(1, 8, 2, 1, 4, 4, seed=17)
    blocks = torch.full((1, 8, 1, 2), -1, dtype=torch.int32)
    blocks[0, 4:, 0, 0] = 1  # queries 4..7 see block 1 (keys 4..7); queries 0..3 have nothing
    out, lse = msa.sparse_attention(q, k, v, blocks, block_size=4, return_lse=True)
    assert torch.equal(out[0, :4], torch.zeros_like(out[0, :4])) and (lse[0, :4] == -math.inf).all()
    assert rel_err(out, msa.reference.sparse_attention(q, k, v, blocks, block_size=4)) < 1e-12


# --------------------------------------------------------------------------- validation

def _valid():
    q, k, v, index_q, index_k = rand_inputs(1, 16, 4, 2, 8, 8, dtype=torch.float32, seed=18)
    blocks = selection(index_q, index_k, block_size=4, topk=2)
    return dict(q=q, k=k, v=v, index_q=index_q, index_k=index_k, blocks=blocks)


BAD_SPARSE = [
    ("q", lambda t: t["q"][0], ValueError, "q must have shape"),
    ("k", lambda t: t["k"][..., :4], ValueError, "k must have shape"),
    ("v", lambda t: t["v"].double(), TypeError, "v must have dtype"),
    ("q", lambda t: t["q"].int(), TypeError, "q must have dtype"),
    ("q", lambda t: t["q"][..., :3, :], ValueError, "multiple of the number of KV heads"),
    ("blocks", lambda t: t["blocks"].float(), TypeError, "block_indices must have dtype"),
    ("blocks", lambda t: t["blocks"][..., :1, :], ValueError, "block_indices must have shape"),
    ("blocks", lambda t: t["blocks"] + 3, ValueError, r"block_indices must lie in \[-1, 3\]"),
    ("blocks", lambda t: t["blocks"] - 2, ValueError, "block_indices must lie in"),
    ("blocks", lambda t: t["blocks"][..., :1].expand(-1, -1, -1, 2), ValueError, "distinct"),
    ("q", lambda t: [1.0], TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("name, corrupt, error, message", BAD_SPARSE)
def test_sparse_attention_rejects_bad_input(name, corrupt, error, message):
    t = _valid()
    t[name] = corrupt(t)
    with pytest.raises(error, match=message):
        msa.sparse_attention(t["q"], t["k"], t["v"], t["blocks"], block_size=4)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(block_size=6), ValueError, "block_size must be a power of two"),
    (dict(block_size=0), ValueError, "block_size must be >= 1"),
    (dict(block_size=4.0), TypeError, "block_size must be an int"),
    (dict(topk=0), ValueError, "topk must be >= 1"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale must be a positive"),
    (dict(cu_seqlens=torch.tensor([0, 16], dtype=torch.int32)), ValueError, r"index_q must have shape \[T, H, D\]"),
])
def test_select_blocks_rejects_bad_arguments(kwargs, error, message):
    t = _valid()
    with pytest.raises(error, match=message):
        msa.select_blocks(t["index_q"], t["index_k"], **{"block_size": 4, **kwargs})


def test_select_blocks_rejects_wrong_index_k():
    t = _valid()
    with pytest.raises(ValueError, match="index_k must have shape"):
        msa.select_blocks(t["index_q"], t["index_k"].expand(-1, -1, 2, -1))
    with pytest.raises(TypeError, match="index_k must have dtype"):
        msa.select_blocks(t["index_q"], t["index_k"].half())


@pytest.mark.parametrize("cu_seqlens, error, message", [
    (torch.tensor([0, 10, 16], dtype=torch.int64), TypeError, "cu_seqlens must have dtype int32"),
    (torch.tensor([0, 10, 16], dtype=torch.int32)[None], ValueError, r"cu_seqlens must have shape \[n \+ 1\]"),
    (torch.tensor([0, 12, 10, 16], dtype=torch.int32), ValueError, "non-decreasing"),
    (torch.tensor([1, 10, 16], dtype=torch.int32), ValueError, "must start at 0 and end at T=16"),
    (torch.tensor([0, 10, 15], dtype=torch.int32), ValueError, "must start at 0 and end at T=16"),
    ([0, 10, 16], TypeError, "cu_seqlens must be an int32 torch.Tensor"),
])
def test_bad_cu_seqlens(cu_seqlens, error, message):
    t = _valid()
    q, k, v = (t[n][0] for n in "qkv")
    with pytest.raises(error, match=message):
        msa.dense_attention(q, k, v, cu_seqlens=cu_seqlens)


def test_index_kl_loss_rejects_mismatched_index_heads():
    t = _valid()
    with pytest.raises(ValueError, match="index_q must have shape"):
        msa.index_kl_loss(t["q"], t["k"], t["index_q"][..., :1, :], t["index_k"], t["blocks"], block_size=4)


# --------------------------------------------------------------------------- the PyTorch path (CPU): every boundary

@pytest.fixture(params=["default", pytest.param("tiny", marks=pytest.mark.slow)])
def cpu_chunking(request, monkeypatch):
    """The CPU path as shipped, and with chunks of a few queries, batches of one or two tiles and tiles of a few
    pairs, so that the merges across chunks, batches, tiles and key chunks of the selection are all exercised."""
    from msa.ops import block_outer, block_select
    if request.param == "tiny":
        monkeypatch.setattr(block_outer, "_CHUNK_PAIRS", 40)
        monkeypatch.setattr(block_outer, "_FORWARD_ELEMENTS", 300)
        monkeypatch.setattr(block_outer, "_BATCH_ELEMENTS", 100)
        monkeypatch.setattr(block_outer, "_TILE_ROWS", 4)
        monkeypatch.setattr(block_select, "_QUERY_CHUNK", 5)
        monkeypatch.setattr(block_select, "_LOGIT_ELEMENTS", 64)
    return request.param


def crowded_blocks(seqlens, groups, block_size, topk, seed):
    """int32 ``[T, G, topk]`` lists, distinct, for packed sequences: block 0 listed by almost every query, block 1
    by none, some blocks wholly after the query, ``-1`` slots anywhere."""
    gen = torch.Generator().manual_seed(seed)
    lists = []
    for seqlen in seqlens:
        n_blocks = math.ceil(seqlen / block_size)
        scores = torch.rand(seqlen, groups, n_blocks + topk, generator=gen)  # the extra columns stand for -1
        scores[..., 0] += 1.0
        if n_blocks > 1:
            scores[..., 1] = -1.0
        picked = scores.topk(topk, dim=-1).indices
        lists.append(torch.where((picked < n_blocks) & (picked != 1), picked, -1))
    return torch.cat(lists).int()


@pytest.mark.parametrize("seqlens, heads, groups, block_size, topk", [
    ([37, 0, 64, 5], 6, 3, 8, 4),  # odd lengths, an empty sequence, GQA groups of 2 heads
    ([45], 4, 1, 4, 3),            # one group of 4 heads
    ([19, 30], 2, 2, 16, 6),       # topk above the number of blocks
])
def test_cpu_path_matches_reference_on_any_block_lists(cpu_chunking, seqlens, heads, groups, block_size, topk):
    q, k, v, index_q, index_k = (x[0] for x in rand_inputs(1, sum(seqlens), heads, groups, 5, 3, seed=21))
    cu_seqlens = cu_seqlens_of(seqlens)
    blocks = crowded_blocks(seqlens, groups, block_size, topk, seed=22)
    varlen = dict(block_size=block_size, cu_seqlens=cu_seqlens)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, index_q, index_k)]
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, index_q, index_k)]

    out, lse = msa.sparse_attention(*leaves[:3], blocks, return_lse=True, **varlen)
    ref_out, ref_lse = msa.reference.sparse_attention(*ref_leaves[:3], blocks, return_lse=True, **varlen)
    assert rel_err(out, ref_out) < 1e-12
    assert torch.equal(lse == -math.inf, ref_lse == -math.inf), "rows that see no key"
    seen = ref_lse > -math.inf
    assert rel_err(lse[seen], ref_lse[seen]) < 1e-6  # returned in float32
    grad_out = torch.randn_like(out)
    for grad, ref in zip(torch.autograd.grad(out, leaves[:3], grad_out),
                         torch.autograd.grad(ref_out, ref_leaves[:3], grad_out)):
        assert rel_err(grad, ref) < 1e-12

    kl = msa.index_kl_loss(*leaves[:2], *leaves[3:], blocks, **varlen)
    ref_kl = msa.reference.index_kl_loss(*ref_leaves[:2], *ref_leaves[3:], blocks, **varlen)
    assert rel_err(kl, ref_kl) < 1e-12
    for grad, ref in zip(torch.autograd.grad(kl, leaves[3:]), torch.autograd.grad(ref_kl, ref_leaves[3:])):
        assert rel_err(grad, ref) < 1e-12


@pytest.mark.parametrize("index_dtype, ties", [(None, False), (None, True), (torch.float8_e4m3fn, False)])
def test_cpu_selection_equals_reference_rows_and_order(cpu_chunking, index_dtype, ties):
    seqlens = [300, 1, 77]
    *_, index_q, index_k = (x[0] for x in rand_inputs(1, sum(seqlens), 2, 2, 2, 8, dtype=torch.float32, seed=23))
    if ties:  # small integers (exact logits in any summation order), every key block a copy of the first
        index_q, index_k = index_q.round(), index_k[:8].round().repeat(math.ceil(sum(seqlens) / 8), 1, 1)
        index_k = index_k[:sum(seqlens)]
    cu_seqlens = cu_seqlens_of(seqlens)
    size = dict(block_size=8, topk=5, cu_seqlens=cu_seqlens, index_dtype=index_dtype)
    blocks, lse = msa.select_blocks(index_q, index_k, return_lse=True, **size)
    ref_blocks, ref_lse = msa.reference.select_blocks(index_q, index_k, return_lse=True, **size)
    assert torch.equal(blocks, ref_blocks), "the same blocks in the same slots"
    assert rel_err(lse, ref_lse) < 1e-6


@pytest.mark.slow
def test_cpu_path_gradcheck_varlen(cpu_chunking):
    seqlens = [9, 0, 6]
    q, k, v, index_q, index_k = (x[0] for x in rand_inputs(1, sum(seqlens), 4, 2, 2, 2, seed=24))
    blocks = crowded_blocks(seqlens, 2, 2, 3, seed=25)
    varlen = dict(block_size=2, cu_seqlens=cu_seqlens_of(seqlens))
    assert torch.autograd.gradcheck(lambda q, k, v: msa.sparse_attention(q, k, v, blocks, **varlen),
                                    tuple(x.requires_grad_() for x in (q, k, v)))
    assert torch.autograd.gradcheck(lambda iq, ik: msa.index_kl_loss(q.detach(), k.detach(), iq, ik, blocks, **varlen),
                                    tuple(x.requires_grad_() for x in (index_q, index_k)))


def test_cpu_index_kl_loss_with_main_lse_in_float32():
    q, k, v, index_q, index_k = rand_inputs(2, 150, 4, 2, 16, 8, dtype=torch.float32, seed=26)
    blocks = selection(index_q, index_k)
    _, main_lse = msa.sparse_attention(q, k, v, blocks, block_size=16, return_lse=True)
    leaves = [x.clone().requires_grad_() for x in (index_q, index_k)]
    kl = msa.index_kl_loss(q, k, *leaves, blocks, block_size=16, main_lse=main_lse)
    iq64, ik64 = (x.double().requires_grad_() for x in (index_q, index_k))
    ref = msa.reference.index_kl_loss(q.double(), k.double(), iq64, ik64, blocks, block_size=16)
    assert rel_err(kl, ref) < 1e-5
    for grad, ref_grad in zip(torch.autograd.grad(kl, leaves), torch.autograd.grad(ref, (iq64, ik64))):
        assert rel_err(grad, ref_grad) < 1e-5


def test_cpu_path_is_deterministic():
    q, k, v, index_q, index_k = rand_inputs(1, 500, 4, 2, 16, 8, dtype=torch.float32, seed=27)
    blocks = selection(index_q, index_k)

    def grads():
        leaves = [x.clone().requires_grad_() for x in (q, k, v, index_q, index_k)]
        out, lse = msa.sparse_attention(*leaves[:3], blocks, block_size=16, return_lse=True)
        kl = msa.index_kl_loss(*leaves[:2], *leaves[3:], blocks, block_size=16, main_lse=lse)
        return torch.autograd.grad(out.square().sum() + kl, leaves)

    assert all(torch.equal(a, b) for a, b in zip(grads(), grads()))


@pytest.mark.parametrize("global_flag, argument, expected", [(False, True, True), (True, False, False),
                                                             (True, None, True), (False, None, False)])
def test_the_pytorch_path_takes_the_deterministic_argument(monkeypatch, global_flag, argument, expected):
    """``deterministic`` reaches the PyTorch path's row accumulations, forward and backward, through the custom
    operators and their autograd (None: torch's setting). On CPUs they are deterministic either way (index_add_
    adds in order); on GPUs, see test_kernels.test_deterministic_gradients_are_bitwise_identical_run_to_run."""
    from msa.ops import block_outer

    q, k, v, index_q, index_k = rand_inputs(1, 100, 4, 2, 16, 8, dtype=torch.float32, seed=32)
    blocks = selection(index_q, index_k)
    flags = []
    add_rows = block_outer._add_rows
    monkeypatch.setattr(block_outer, "_add_rows", lambda *args: flags.append(args[-1]) or add_rows(*args))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(global_flag)
    try:
        def grads():
            leaves = [x.clone().requires_grad_() for x in (q, k, v, index_q, index_k)]
            out, lse = msa.sparse_attention(*leaves[:3], blocks, block_size=16, return_lse=True,
                                            deterministic=argument)
            kl = msa.index_kl_loss(*leaves[:2], *leaves[3:], blocks, block_size=16, main_lse=lse,
                                   deterministic=argument)
            return torch.autograd.grad(out.square().sum() + kl, leaves)

        first = grads()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert flags and set(flags) == {expected}
    flags.clear()
    # again under torch's setting as it was: the same gradients, bitwise
    assert all(torch.equal(a, b) for a, b in zip(first, grads()))
    assert set(flags) == {previous if argument is None else argument}


@pytest.mark.parametrize("op", ["sparse_attention", "index_kl_loss"])
def test_the_deterministic_argument_must_be_a_bool_or_none(op):
    t = _valid()
    call = dict(sparse_attention=lambda: msa.sparse_attention(t["q"], t["k"], t["v"], t["blocks"], block_size=4,
                                                              deterministic=1),
                index_kl_loss=lambda: msa.index_kl_loss(t["q"], t["k"], t["index_q"], t["index_k"], t["blocks"],
                                                        block_size=4, deterministic="yes"))[op]
    with pytest.raises(TypeError, match="deterministic must be None or a bool"):
        call()
