"""Context parallelism (msa.distributed) equals one process: torchrun over gloo, float64, 1 to 4 ranks.

Each case launches ``tests/cp_worker.py`` on N processes; every rank checks
its shard's outputs, selection, KL loss and the gradients of all inputs
against the whole sequences run in one process: with the reference, with
the public ops (sparse, and dense as in the indexer warm-up) and through
``MSAAttention(context_parallel_group=...)``.

In this process, with the collectives replaced by recorders: the order in
which ``context_parallel_attention`` issues and waits on them around the
selection (the all-gathers of K and V in flight while the blocks are
selected), and that one rank issues none.
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from msa.distributed import context_parallel_attention
from msa.nn.index_branch import msa_attention, msa_select

TESTS = Path(__file__).parent


def launch(n_ranks: int, check: str, layout: str, report_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n_ranks}",
               str(TESTS / "cp_worker.py"), check, layout, str(report_dir)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


# (ranks, check, layout): the reference on every rank count and layout, the ops and the module on a spread
CASES = [(n, "reference", layout) for n in (1, 2, 3, 4) for layout in ("batched", "packed")]
CASES += [(2, "ops", "batched"), (3, "ops", "packed"), (4, "ops", "packed"), (2, "ops-dense", "packed"),
          (3, "ops-dense", "batched"), (3, "module", "batched"), (4, "module", "packed"), (2, "ops", "single"),
          (3, "ops", "single"), (2, "module", "single")]


@pytest.mark.parametrize(("n_ranks", "check", "layout"), [(2, "ops", "packed")] + [
    pytest.param(*case, marks=pytest.mark.slow) for case in CASES])
def test_context_parallel_equals_one_process(n_ranks, check, layout, tmp_path):
    result = launch(n_ranks, check, layout, tmp_path)
    reports = sorted(path.read_text() for path in tmp_path.glob("rank*.txt"))
    assert result.returncode == 0 and len(reports) == n_ranks, "\n".join(reports) + result.stderr[-3000:]
    assert all(report.endswith(": equal") for report in reports), "\n".join(reports)


class RecordedCollectives:
    """``torch.distributed`` over ``world_size`` ranks emulated in this process: the collectives record their
    calls in ``events`` (the gathered tensor named by ``names``: data pointer -> name) and all ranks hold this
    rank's shard (values for the order of the calls only)."""

    def __init__(self, monkeypatch, world_size: int, names: dict[int, str]):
        self.world_size, self.names, self.events = world_size, names, []
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: world_size)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
        for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce"):
            monkeypatch.setattr(dist, name, getattr(self, name))

    def issued(self, collective: str, name: str, async_op: bool):
        self.events.append((collective, name))
        return Work(self.events, name) if async_op else None

    def all_gather_into_tensor(self, output, local, group=None, async_op=False):
        output.copy_(local.repeat(self.world_size, *[1] * (local.dim() - 1)))
        return self.issued("all_gather", self.names[local.data_ptr()], async_op)

    def reduce_scatter_tensor(self, output, gathered, group=None, async_op=False):
        output.copy_(gathered.unflatten(0, (self.world_size, -1)).sum(0))
        return self.issued("reduce_scatter", "d index_k" if gathered.shape[-2] == 1 else "dk or dv", async_op)

    def all_reduce(self, tensor, group=None, async_op=False):
        return self.issued("all_reduce", "kl", async_op)

    def recorded(self, name: str, function):
        def call(*args, **kwargs):
            self.events.append((name,))
            return function(*args, **kwargs)
        return call


class Work:
    def __init__(self, events, name):
        self.events, self.name = events, name

    def wait(self):
        self.events.append(("wait", self.name))
        return True


def packed_inputs(seqlens: list[int]):
    """Packed float64 q, k, v, index_q, index_k (Hq=4, G=2, D=8, Di=6) of ``seqlens`` tokens and their
    ``cu_seqlens``."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 8), (2, 8), (2, 8), (2, 6), (1, 6)]
    inputs = [torch.randn(sum(seqlens), *shape, generator=generator, dtype=torch.float64).requires_grad_()
              for shape in shapes]
    return inputs, torch.tensor([0, *seqlens]).cumsum(0).to(torch.int32)


SETTINGS = dict(block_size=4, topk=2, compute_kl_loss=True)


def test_the_key_value_all_gathers_are_in_flight_while_the_blocks_are_selected(monkeypatch):
    """Two ranks emulated in one process: the all-gathers of the index keys, K and V are issued at once; the
    index keys are waited on before the selection, K and V after it and before the attention. In the backward
    pass the three reduce-scatters are issued before any is waited on."""
    inputs, cu_seqlens = packed_inputs([16, 8])
    q, k, v, index_q, index_k = inputs
    collectives = RecordedCollectives(monkeypatch, 2, {k.data_ptr(): "k", v.data_ptr(): "v",
                                                       index_k.data_ptr(): "index_k"})
    attention = collectives.recorded("attention", functools.partial(msa_attention, mode="sparse", **SETTINGS))
    select = collectives.recorded("select", functools.partial(msa_select, **SETTINGS))
    out, kl, _ = context_parallel_attention(attention, *inputs, cu_seqlens=cu_seqlens, select=select)
    assert collectives.events == [
        ("all_gather", "index_k"), ("all_gather", "k"), ("all_gather", "v"), ("wait", "index_k"),
        ("select",), ("select",), ("wait", "k"), ("wait", "v"), ("attention",), ("attention",), ("all_reduce", "kl")]

    collectives.events.clear()
    (out.sum() + kl).backward()
    assert collectives.events == [
        ("reduce_scatter", "dk or dv"), ("reduce_scatter", "dk or dv"), ("reduce_scatter", "d index_k"),
        ("wait", "dk or dv"), ("wait", "dk or dv"), ("wait", "d index_k")]


def test_one_rank_runs_the_plain_attention_without_collectives(monkeypatch):
    inputs, cu_seqlens = packed_inputs([16, 8])
    collectives = RecordedCollectives(monkeypatch, 1, {})
    attention = functools.partial(msa_attention, mode="sparse", **SETTINGS)
    out, kl, blocks = context_parallel_attention(attention, *inputs, cu_seqlens=cu_seqlens,
                                                 select=functools.partial(msa_select, **SETTINGS))
    expected = attention(*inputs, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=16, max_seqlen_k=16)
    assert collectives.events == []
    assert all(torch.equal(a, b) for a, b in zip((out, kl, blocks), expected))


def test_msa_attention_refuses_a_selection_of_other_settings():
    (q, k, v, index_q, index_k), cu_seqlens = packed_inputs([16, 8])
    varlen = dict(cu_seqlens=cu_seqlens, max_seqlen=16)
    narrow = msa_select(index_q, index_k, **SETTINGS, **varlen)
    with pytest.raises(ValueError, match="topk=2; these settings select block_size=4, topk=3"):
        msa_attention(q, k, v, index_q, index_k, mode="sparse", **SETTINGS, kl_topk=3, selection=narrow, **varlen)
    with pytest.raises(TypeError, match="selection must be a Selection"):
        msa_attention(q, k, v, index_q, index_k, mode="sparse", **SETTINGS, selection=narrow.block_indices, **varlen)
