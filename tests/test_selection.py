"""msa.Selection: a selection checked once, whose derived structures the ops build once and share."""

import pytest
import torch

import msa
from helpers import cu_seqlens_of, pack, rand_inputs, rel_err
from msa.nn import RotaryEmbedding
from msa.ops import backend, block_outer, library, selection as selection_module

BLOCK, TOPK = 16, 3


def _select(index_q, index_k, **varlen):
    return msa.select_blocks(index_q, index_k, block_size=BLOCK, topk=TOPK, return_selection=True, **varlen)


@pytest.mark.parametrize("varlen", [False, True])
def test_ops_given_a_selection_match_the_reference(varlen):
    inputs = rand_inputs(2, 70, 4, 2, 8, 8, seed=31)
    kwargs = {}
    if varlen:
        seqlens = [70, 41]
        inputs = [pack(x, seqlens) for x in inputs]
        kwargs = dict(cu_seqlens=cu_seqlens_of(seqlens))
    q, k, v, index_q, index_k = (x.requires_grad_() for x in inputs)
    selection = _select(index_q, index_k, **kwargs)
    assert isinstance(selection, msa.Selection) and selection.block_size == BLOCK
    assert torch.equal(selection.block_indices,
                       msa.select_blocks(index_q, index_k, block_size=BLOCK, topk=TOPK, **kwargs))
    blocks, reference = selection.block_indices, msa.reference
    out, lse = msa.sparse_attention(q, k, v, selection, return_lse=True)
    ref_out, ref_lse = reference.sparse_attention(q, k, v, blocks, block_size=BLOCK, return_lse=True, **kwargs)
    assert rel_err(out, ref_out) < 1e-12 and rel_err(lse, ref_lse) < 1e-6
    grad_out = torch.randn_like(out)
    for grad, ref in zip(torch.autograd.grad(out, (q, k, v), grad_out),
                         torch.autograd.grad(ref_out, (q, k, v), grad_out)):
        assert rel_err(grad, ref) < 1e-12
    kl = msa.index_kl_loss(q, k, index_q, index_k, selection, main_lse=lse)
    ref_kl = reference.index_kl_loss(q, k, index_q, index_k, blocks, block_size=BLOCK, **kwargs)
    assert rel_err(kl, ref_kl) < 1e-12
    for grad, ref in zip(torch.autograd.grad(kl, (index_q, index_k)), torch.autograd.grad(ref_kl, (index_q, index_k))):
        assert rel_err(grad, ref) < 1e-12


def test_select_blocks_returns_a_selection_with_its_lse():
    *_, index_q, index_k = rand_inputs(1, 50, 2, 2, 8, 8, dtype=torch.float32, seed=32)
    selection, lse = msa.select_blocks(index_q, index_k, block_size=BLOCK, topk=TOPK, return_lse=True,
                                       return_selection=True)
    ref_blocks, ref_lse = msa.reference.select_blocks(index_q.double(), index_k.double(), block_size=BLOCK, topk=TOPK,
                                                      return_lse=True)
    assert torch.equal(selection.block_indices.sort(-1).values, ref_blocks.sort(-1).values)
    assert rel_err(lse, ref_lse) < 1e-6
    assert selection.cu_seqlens is None and selection.max_seqlen == 50 and selection.topk == TOPK


def _count_calls(monkeypatch, module, name: str) -> list:
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(name) or real(*args, **kwargs))
    return calls


def test_from_indices_checks_once_and_the_ops_never_again(monkeypatch):
    q, k, v, index_q, index_k = rand_inputs(1, 40, 4, 2, 8, 8, seed=33)
    blocks = msa.reference.select_blocks(index_q, index_k, block_size=8, topk=2)
    checks = _count_calls(monkeypatch, selection_module, "check_block_indices")
    selection = msa.Selection.from_indices(blocks.long(), 8)
    assert selection.block_indices.dtype == torch.int32 and len(checks) == 1
    out = msa.sparse_attention(q, k, v, selection)
    kl = msa.index_kl_loss(q, k, index_q, index_k, selection)
    assert len(checks) == 1
    assert torch.equal(out, msa.sparse_attention(q, k, v, blocks, block_size=8)) and len(checks) == 2
    assert rel_err(out, msa.reference.sparse_attention(q, k, v, blocks, block_size=8)) < 1e-12
    assert rel_err(kl, msa.reference.index_kl_loss(q, k, index_q, index_k, blocks, block_size=8)) < 1e-12


@pytest.mark.parametrize("mode, kl_topk, plans", [("sparse", None, 1), ("dense", None, 1), ("sparse", 3, 2),
                                                   ("dense", 3, 1)])
def test_a_training_step_tiles_each_selection_once_and_checks_none(monkeypatch, mode, kl_topk, plans):
    """Forward, KL loss and backward of one layer: one index scoring pass (a wider KL support ranks its blocks,
    the attention's are cut from them), one tile plan per selection the layer attends over (the attention, its
    backward and the KL loss share it), no check of the layer's own selections."""
    layer = msa.MSAAttention(32, 4, 2, 8, index_head_dim=8, block_size=8, topk=2, mode=mode, kl_topk=kl_topk).train()
    x = torch.randn(2, 40, 32)
    rope = RotaryEmbedding(8)(torch.arange(40).expand(2, -1))
    built = _count_calls(monkeypatch, block_outer, "plan")
    checks = _count_calls(monkeypatch, selection_module, "check_block_indices")
    scored = _count_calls(monkeypatch, library, "torch_select_blocks")
    out, kl = layer(x, rope)
    (out.square().sum() + kl).backward()
    assert len(built) == plans and not checks and len(scored) == 1
    assert all(p.grad is not None for p in layer.parameters())


def test_selection_misuse_gets_clear_errors():
    q, k, v, index_q, index_k = rand_inputs(1, 40, 4, 2, 8, 8, seed=34)
    blocks = msa.reference.select_blocks(index_q, index_k, block_size=8, topk=2)
    selection = msa.Selection.from_indices(blocks, 8)
    bad_indices = [
        (lambda: msa.Selection.from_indices(blocks.float(), 8), TypeError, "block_indices must have dtype"),
        (lambda: msa.Selection.from_indices(blocks[0], 8), ValueError, r"block_indices must have shape \[B, S, G, t"),
        (lambda: msa.Selection.from_indices(blocks + 5, 8), ValueError, r"block_indices must lie in \[-1, 4\]"),
        (lambda: msa.Selection.from_indices(blocks, 12), ValueError, "block_size must be a power of two"),
        (lambda: msa.Selection.from_indices(blocks[0], 8, cu_seqlens=cu_seqlens_of([30])), ValueError,
         "cu_seqlens must start at 0 and end at T=40"),
        (lambda: msa.sparse_attention(q, k, v, selection, block_size=16), ValueError,
         "block_size=16 differs from the Selection's block_size=8"),
        (lambda: msa.index_kl_loss(q[0], k[0], index_q[0], index_k[0], selection, cu_seqlens=cu_seqlens_of([40])),
         ValueError, "cu_seqlens comes with the Selection: leave it None"),
        (lambda: msa.sparse_attention(q[:, :20], k[:, :20], v[:, :20], selection), ValueError,
         r"q must have shape \[B, S, H, D\] with the Selection's \[1, 40\]"),
        (lambda: msa.sparse_attention(q, k[..., :1, :], v[..., :1, :], selection), ValueError,
         r"block_indices \(a Selection\) must have shape \[B, S, G, topk\] with G=1"),
        (lambda: msa.sparse_attention(q, k, v, msa.Selection(blocks.to("meta"), 8, selection.layout)), ValueError,
         r"block_indices \(a Selection\) must be on cpu"),
        (lambda: msa.sparse_attention(q, k, v, blocks.to("meta"), block_size=8), ValueError,
         "block_indices must be on cpu"),
    ]
    for call, error, message in bad_indices:
        with pytest.raises(error, match=message):
            call()


@pytest.mark.skipif(not backend.HAVE_TRITON, reason="needs triton (its interpreter on CPUs)")
@pytest.mark.parametrize("deterministic", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_the_kernels_take_a_selection_and_derive_token_starts_once(monkeypatch, deterministic):
    """MSA_BACKEND=triton (the interpreter on CPUs): attention and the KL loss (fused, or with its own backward
    pass under deterministic algorithms) on one Selection match the float64 reference, forward and backward, and the
    token offsets the launchers take, and the block lists their KV-outer kernels walk, are built once."""
    from msa.kernels import block_csr

    monkeypatch.setenv("MSA_BACKEND", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = rand_inputs(1, 48, 2, 1, 16, 16, dtype=torch.float32, seed=35, device=device)
    q, k, v, index_q, index_k = (x.requires_grad_() for x in inputs)
    selection = msa.select_blocks(index_q, index_k, block_size=16, topk=2, return_selection=True)
    starts = _count_calls(monkeypatch, selection_module, "token_positions")
    lists = _count_calls(monkeypatch, block_csr, "build_block_csr")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        out = msa.sparse_attention(q, k, v, selection)
        kl = msa.index_kl_loss(q, k, index_q, index_k, selection)
        grads = torch.autograd.grad(out.square().sum() + kl, (q, k, v, index_q, index_k))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert len(starts) == 1 and len(lists) == 1
    q64, k64, v64, iq64, ik64 = (x.detach().double().requires_grad_() for x in inputs)
    blocks = selection.block_indices
    ref_out = msa.reference.sparse_attention(q64, k64, v64, blocks, block_size=16)
    ref_kl = msa.reference.index_kl_loss(q64, k64, iq64, ik64, blocks, block_size=16)
    bound = 2e-3 if device == "cuda" else 1e-5  # float32 inputs meet TF32 products on GPUs
    assert rel_err(out, ref_out) < bound and rel_err(kl, ref_kl) < bound
    for grad, ref in zip(grads, torch.autograd.grad(ref_out.square().sum() + ref_kl, (q64, k64, v64, iq64, ik64))):
        assert rel_err(grad, ref) < 10 * bound
