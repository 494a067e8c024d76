"""torch.compile of MSA layers (fullgraph, forward and backward), the custom operators' opcheck, CUDA graphs."""

import pytest
import torch
from torch._dynamo.utils import counters

import msa
from helpers import cu_seqlens_of, rand_inputs, rel_err
from msa.nn import RotaryEmbedding
from msa.ops import backend, block_outer, library

SEQLEN, BLOCK, TOPK = 40, 8, 2


def _projections(layer, x, rope, **varlen):
    """The rotated q, k, v, index_q, index_k the layer computes from ``x`` (caught through its ``attend`` hook)."""
    caught = []
    layer(x, rope, attend=lambda *tensors: caught.extend(tensors) or torch.zeros_like(tensors[0]), **varlen)
    return caught


@pytest.mark.parametrize("mode, kl_topk, varlen", [("sparse", None, False),
                                                   pytest.param("dense", None, False, marks=pytest.mark.slow),
                                                   pytest.param("sparse", 4, False, marks=pytest.mark.slow),
                                                   pytest.param("sparse", None, True, marks=pytest.mark.slow)])
def test_compiled_layer_matches_the_reference_and_eager_without_graph_breaks(mode, kl_topk, varlen):
    """``torch.compile(fullgraph=True)`` of a layer's forward and backward: one graph; its output and KL loss are
    the float64 reference's, its gradients eager's."""
    torch.manual_seed(0)
    layer = msa.MSAAttention(32, 4, 2, 8, index_head_dim=8, block_size=BLOCK, topk=TOPK, mode=mode,
                             kl_topk=kl_topk).double().train()
    x = torch.randn(2, SEQLEN, 32, dtype=torch.float64)
    rope = RotaryEmbedding(8)(torch.arange(SEQLEN).expand(2, -1), dtype=torch.float64)
    kwargs = {}
    if varlen:  # packed, the layout's max_seqlen given (no reading of cu_seqlens while tracing)
        x, rope = x.flatten(0, 1), tuple(r.flatten(0, 1) for r in rope)
        kwargs = dict(cu_seqlens=cu_seqlens_of([SEQLEN, SEQLEN]), max_seqlen=SEQLEN)

    def step(x):
        out, kl = layer(x, rope, **kwargs)
        return out, kl

    torch._dynamo.reset()
    counters.clear()
    out, kl = torch.compile(step, fullgraph=True)(x)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
    compiled_grads = torch.autograd.grad(out.square().sum() + kl, list(layer.parameters()))

    q, k, v, index_q, index_k = _projections(layer, x, rope, **kwargs)
    reference, varlen_args = msa.reference, dict(cu_seqlens=kwargs.get("cu_seqlens"))
    blocks = reference.select_blocks(index_q, index_k, block_size=BLOCK, topk=TOPK, **varlen_args)
    attended = reference.sparse_attention(q, k, v, blocks, block_size=BLOCK, **varlen_args) if mode == "sparse" \
        else reference.dense_attention(q, k, v, **varlen_args)
    kl_blocks = reference.select_blocks(index_q, index_k, block_size=BLOCK, topk=kl_topk or TOPK, **varlen_args)
    assert rel_err(out, layer.o_proj(attended.flatten(-2))) < 1e-12
    assert rel_err(kl, reference.index_kl_loss(q, k, index_q, index_k, kl_blocks, block_size=BLOCK,
                                               **varlen_args)) < 1e-12
    eager_out, eager_kl = step(x)
    for grad, eager in zip(compiled_grads, torch.autograd.grad(eager_out.square().sum() + eager_kl,
                                                               list(layer.parameters()))):
        assert rel_err(grad, eager) < 1e-12


def _pytorch_path_inputs(dtype):
    q, k, v, index_q, index_k = (x[0] for x in rand_inputs(1, 37, 4, 2, 8, 8, dtype=dtype, seed=41))
    cu_seqlens = cu_seqlens_of([25, 12])
    blocks = msa.reference.select_blocks(index_q, index_k, block_size=BLOCK, topk=3, cu_seqlens=cu_seqlens)
    plan = library.tile_plan(blocks, cu_seqlens, cu_seqlens, 37, BLOCK, 2, block_outer.forward_chunk_pairs(2, 8))
    return q, k, v, index_q, index_k, blocks, cu_seqlens, plan


def _leaves(*tensors):
    return tuple(x.detach().requires_grad_() for x in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float64, marks=pytest.mark.slow)])
def test_opcheck_the_pytorch_path_operators(dtype):
    """Schemas, fake implementations, autograd registrations: each operator, with and without gradients."""
    q, k, v, index_q, index_k, blocks, cu_seqlens, plan = _pytorch_path_inputs(dtype)
    out, lse = library.torch_sparse_attention(q, k, v, plan, BLOCK, 0.3, False)
    cases = [
        (library.tile_plan, (blocks, cu_seqlens, cu_seqlens, 37, BLOCK, 2, 16)),
        (library.torch_sparse_attention, (*_leaves(q, k, v), plan, BLOCK, 0.3, False)),
        (library.torch_sparse_attention, (*_leaves(q, k, v), plan, BLOCK, 0.3, True)),
        (library.torch_sparse_attention, (q, k, v, plan, BLOCK, 0.3, False)),
        (library.torch_sparse_attention_backward, (q, k, v, out, lse, torch.randn_like(out), plan, BLOCK, 0.3,
                                                   False)),
        (library.torch_index_kl, (q, k, *_leaves(index_q, index_k), plan, BLOCK, 0.3, 0.4, None, True, False)),
        (library.torch_index_kl, (q, k, *_leaves(index_q, index_k), plan, BLOCK, 0.3, 0.4, None, True, True)),
        (library.torch_index_kl, (q, k, index_q, index_k, plan, BLOCK, 0.3, 0.4, lse.float(), False, False)),
        (library.torch_select_blocks, (index_q, index_k, cu_seqlens, cu_seqlens, BLOCK, 3, 0.4, False)),
        (library.torch_select_blocks, (index_q, index_k, cu_seqlens, cu_seqlens, BLOCK, 3, 0.4, True)),
        (library.torch_support_lse, (index_q, index_k, blocks, cu_seqlens, cu_seqlens, BLOCK, 0.4)),
    ]
    for operator, args in cases:
        torch.library.opcheck(operator, args)


@pytest.mark.slow
@pytest.mark.skipif(not backend.HAVE_TRITON, reason="needs triton (its interpreter on CPUs)")
def test_opcheck_the_kernel_operators():
    """The ``triton_*`` operators (under the interpreter on CPUs) in float32, the smallest shapes they take."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, index_q, index_k = (x[0] for x in rand_inputs(1, 32, 2, 1, 16, 16, dtype=torch.float32, seed=42,
                                                              device=device))
    cu_seqlens, starts = cu_seqlens_of([32], device=device), torch.zeros(32, dtype=torch.int32, device=device)
    blocks = library.triton_select_blocks(index_q, index_k, cu_seqlens, 32, 16, 2, False)
    out, lse = library.triton_sparse_attention(q, k, v, blocks, starts, cu_seqlens, 32, 16, 0.3, False)
    _, index_lse, teacher_lse = library.triton_index_kl(q, k, index_q, index_k, blocks, starts, cu_seqlens, 32, 16,
                                                        0.3, 0.4, None, False)
    settings = (cu_seqlens, 32, 16, 0.3, 0.4)
    cases = [
        (library.triton_select_blocks, (index_q, index_k, cu_seqlens, 32, 16, 2, False)),
        (library.triton_support_lse, (index_q, index_k, blocks, starts, 16, 0.4)),
        (library.triton_sparse_attention, (*_leaves(q, k, v), blocks, starts, cu_seqlens, 32, 16, 0.3, False)),
        (library.triton_sparse_attention, (*_leaves(q, k, v), blocks, starts, cu_seqlens, 32, 16, 0.3, True)),
        (library.triton_sparse_attention_backward, (q, k, v, out, lse, torch.randn_like(out), blocks, starts,
                                                    cu_seqlens, 32, 16, 0.3, False)),
        (library.triton_index_kl, (q, k, *_leaves(index_q, index_k), blocks, starts, *settings, lse, True)),
        (library.triton_index_kl_backward, (q, k, index_q, index_k, blocks, starts, cu_seqlens, 32, teacher_lse,
                                            index_lse, torch.ones((), device=device), 16, 0.3, 0.4, False)),
        (library.triton_index_kl_fused, (q, k, *_leaves(index_q, index_k), blocks, *settings, None)),
    ]
    for operator, args in cases:
        torch.library.opcheck(operator, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_training_step_replays_from_a_cuda_graph():
    """A whole training step of a layer (forward, KL loss, backward) captured once, replayed on new inputs: the
    gradients of an eager step on the same inputs."""
    torch.manual_seed(0)
    layer = msa.MSAAttention(128, 8, 2, 64, index_head_dim=64, block_size=64, topk=4).cuda().bfloat16().train()
    x = torch.randn(2, 512, 128, device="cuda", dtype=torch.bfloat16)
    rope = RotaryEmbedding(64)(torch.arange(512, device="cuda").expand(2, -1), dtype=torch.bfloat16)
    params = list(layer.parameters())

    def step():
        for param in params:
            param.grad = None if param.grad is None else param.grad.zero_()
        out, kl = layer(x, rope)
        (out.float().square().mean() + kl).backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: Triton compilation, the gradients' buffers
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x.copy_(torch.randn_like(x))
    graph.replay()
    replayed = [param.grad.clone() for param in params]
    step()
    for grad, param in zip(replayed, params):
        assert rel_err(grad, param.grad) < 1e-2
