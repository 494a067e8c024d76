"""One rank of the context-parallel exactness test (tests/test_context_parallel.py launches it with torchrun).

Every rank builds the same float64 inputs, runs the whole sequences in one
process (the expected results), then its shard through
``context_parallel_attention`` over gloo, and compares: outputs, selections,
the KL loss and the gradients of all five inputs. Exits 1 on a mismatch.

    torchrun --standalone --nproc-per-node N tests/cp_worker.py CHECK LAYOUT REPORT_DIR

LAYOUT: ``batched`` (two sequences), ``single`` (one: a rank's two chunks
follow each other, no reordering) or ``packed`` (varlen, of different
lengths). CHECK: ``reference``, ``ops`` or ``ops-dense`` (the attention and the
selection given to ``context_parallel_attention``), or ``module``
(``MSAAttention`` with a context-parallel group, which selects inside its
attention; parameter gradients summed over the ranks).

Each rank writes its verdict to ``REPORT_DIR/rank<r>.txt``.
"""

import functools
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from msa import reference
from msa.distributed import context_parallel_attention, shard
from msa.nn import MSAAttention
from msa.nn.index_branch import msa_attention, msa_select
from msa.nn.rotary import RotaryEmbedding

BLOCK_SIZE, TOPK = 4, 3
BATCH = {"batched": 2, "single": 1}  # sequences of the batched layouts ("packed": three of different lengths)


def reference_select(index_q, index_k, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    return reference.select_blocks(index_q.detach(), index_k.detach(), topk=TOPK, cu_seqlens_q=cu_seqlens_q,
                                   cu_seqlens_k=cu_seqlens_k, block_size=BLOCK_SIZE)


def reference_attention(q, k, v, index_q, index_k, *, selection=None, **varlen):
    blocks = reference_select(index_q, index_k, **varlen) if selection is None else selection
    layout = dict(cu_seqlens_q=varlen["cu_seqlens_q"], cu_seqlens_k=varlen["cu_seqlens_k"], block_size=BLOCK_SIZE)
    out = reference.sparse_attention(q, k, v, blocks, **layout)
    return out, reference.index_kl_loss(q, k, index_q, index_k, blocks, **layout), blocks


def ops(mode: str, **settings):
    """``msa_attention`` and its ``msa_select`` with the same settings."""
    settings = dict(block_size=BLOCK_SIZE, topk=TOPK, compute_kl_loss=True, **settings)
    return functools.partial(msa_attention, mode=mode, **settings), functools.partial(msa_select, **settings)


# (attention, select): context parallelism selects while K and V are gathered; one process runs the attention alone
ATTENTIONS = {
    "reference": (reference_attention, reference_select),
    "ops": ops("sparse"),
    "ops-dense": ops("dense", kl_topk=TOPK + 2),  # the warm-up, with a wider KL support cut to the attention's top-k
}


def module_check(layout: str, world_size: int) -> list[str]:
    """``MSAAttention(context_parallel_group=...)`` on this rank's shard against the layer on the whole batch:
    outputs, the KL loss and every parameter's gradient (summed over the ranks)."""
    torch.manual_seed(0)
    options = dict(index_head_dim=8, block_size=BLOCK_SIZE, topk=TOPK)
    layer = MSAAttention(32, 4, 2, 8, **options).double()
    cp_layer = MSAAttention(32, 4, 2, 8, **options, context_parallel_group=dist.group.WORLD).double()
    cp_layer.load_state_dict(layer.state_dict())
    rotary = RotaryEmbedding(8)
    if layout in ("batched", "single"):
        x = torch.randn(BATCH[layout], 2 * world_size * 5, 32, dtype=torch.float64)
        positions, cu_seqlens = torch.arange(x.shape[1]).expand(x.shape[0], -1), None
    else:
        seqlens = [2 * world_size * n for n in (3, 1)]
        x = torch.randn(sum(seqlens), 32, dtype=torch.float64)
        positions = torch.cat([torch.arange(n) for n in seqlens])
        cu_seqlens = torch.tensor([0, *seqlens]).cumsum(0).to(torch.int32)
    rope = rotary(positions, dtype=x.dtype)
    out, kl = layer(x, rope, cu_seqlens=cu_seqlens, compute_kl_loss=True)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad((out * grad_out).sum() + kl, list(layer.parameters()))

    local = dict(cu_seqlens=cu_seqlens)
    cp_out, cp_kl = cp_layer(shard(x, **local), tuple(shard(r, **local) for r in rope), cu_seqlens=cu_seqlens,
                             compute_kl_loss=True)
    cp_grads = torch.autograd.grad((cp_out * shard(grad_out, **local)).sum() + cp_kl, list(cp_layer.parameters()))
    for grad in cp_grads:
        dist.all_reduce(grad)
    checks = [("module out", cp_out, shard(out, **local)), ("module kl", cp_kl, kl)]
    checks += [(f"module grad {name}", cp_grad, grad)
               for (name, _), cp_grad, grad in zip(layer.named_parameters(), cp_grads, grads)]
    return [f"{name}: rel err {rel_err(a, b):.1e}" for name, a, b in checks if not rel_err(a, b) < 1e-12]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def attention_check(attention_name: str, layout: str, world_size: int) -> list[str]:
    """``context_parallel_attention`` on this rank's shard against the attention of the whole sequences."""
    attention, select = ATTENTIONS[attention_name]
    generator = torch.Generator().manual_seed(0)
    heads, groups, head_dim, index_dim = 4, 2, 8, 8
    if layout in ("batched", "single"):
        seqlen = 2 * world_size * 5
        lead, cu_seqlens = (BATCH[layout], seqlen), None
    else:
        seqlens = [2 * world_size * n for n in (3, 7, 1)]
        lead, cu_seqlens = (sum(seqlens),), torch.tensor([0, *seqlens]).cumsum(0).to(torch.int32)
    shapes = [(heads, head_dim), (groups, head_dim), (groups, head_dim), (groups, index_dim), (1, index_dim)]
    inputs = [torch.randn(*lead, *shape, generator=generator, dtype=torch.float64) for shape in shapes]
    grad_out = torch.randn(*lead, heads, head_dim, generator=generator, dtype=torch.float64)

    # the whole sequences in one process
    leaves = [x.clone().requires_grad_() for x in inputs]
    packed = [x.flatten(0, 1) for x in leaves] if cu_seqlens is None else leaves
    offsets = cu_seqlens if cu_seqlens is not None else torch.arange(0, lead[0] * seqlen + 1, seqlen, dtype=torch.int32)
    longest = int(offsets.diff().max())
    out, kl, blocks = attention(*packed, cu_seqlens_q=offsets, cu_seqlens_k=offsets, max_seqlen_q=longest,
                                max_seqlen_k=longest)
    out, blocks = (x.unflatten(0, lead) for x in (out, blocks)) if cu_seqlens is None else (out, blocks)
    grads = torch.autograd.grad((out * grad_out).sum() + kl, leaves)

    # this rank's shard through context parallelism
    local = [shard(x, cu_seqlens=cu_seqlens).detach().requires_grad_() for x in inputs]
    cp_out, cp_kl, cp_blocks = context_parallel_attention(attention, *local, cu_seqlens=cu_seqlens, select=select)
    cp_grads = torch.autograd.grad((cp_out * shard(grad_out, cu_seqlens=cu_seqlens)).sum() + cp_kl, local)

    failures = []
    if world_size > 1:
        odd = 2 * world_size + 1
        try:
            shard(torch.zeros(odd, 3), cu_seqlens=torch.tensor([0, odd], dtype=torch.int32))
            failures.append("shard took a length that is not a multiple of 2 W")
        except ValueError as error:
            if f"multiples of 2 x {world_size}" not in str(error):
                failures.append(f"unclear error: {error}")
    if not torch.equal(cp_blocks, shard(blocks, cu_seqlens=cu_seqlens)):
        failures.append("block_indices")
    checks = [("out", cp_out, shard(out, cu_seqlens=cu_seqlens)), ("kl", cp_kl, kl)]
    checks += [(f"grad {name}", cp_grad, shard(grad, cu_seqlens=cu_seqlens))
               for name, cp_grad, grad in zip(("q", "k", "v", "index_q", "index_k"), cp_grads, grads)]
    failures += [f"{name}: rel err {rel_err(a, b):.1e}" for name, a, b in checks if not rel_err(a, b) < 1e-12]
    return failures


def main(check: str, layout: str, report_dir: str) -> int:
    dist.init_process_group("gloo")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    failures = module_check(layout, world_size) if check == "module" else attention_check(check, layout, world_size)
    verdict = f"rank {rank}/{world_size} {check} {layout}: " + ("; ".join(failures) or "equal")
    Path(report_dir, f"rank{rank}.txt").write_text(verdict)
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
