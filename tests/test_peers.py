"""benchmarks/peers.py's conversion of a selection to flash-linear-attention's NSA format: fla's selected-attention
kernel then computes what msa.sparse_attention computes, forward and backward. Skipped where fla is not installed
(it is not a dependency of msa; see benchmarks/README.md)."""

import sys
import warnings
from pathlib import Path

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # fla warns that flash-attn is missing and, without a GPU, that it runs on CPU
    pytest.importorskip("fla")
    pytest.importorskip("einops")
    from fla.ops.nsa.parallel import ParallelNSAFunction

import msa

# peers.py imports benchmarks/kernels.py as ``kernels``, the name of Hugging Face's kernels package, which
# transformers looks up: import it with benchmarks/ on the path, then leave sys.path and sys.modules as they were.
BENCHMARKS = str(Path(__file__).parents[1] / "benchmarks")
SHADOWED = ("kernels", "flops")
saved = {name: sys.modules.pop(name) for name in SHADOWED if name in sys.modules}
sys.path.insert(0, BENCHMARKS)
try:
    import peers  # noqa: E402
finally:
    sys.path.remove(BENCHMARKS)
    for name in SHADOWED:
        sys.modules.pop(name, None)
    sys.modules.update(saved)


@pytest.fixture
def one_config_each():
    """Without a GPU, keep the first configuration of each of fla's autotuned kernels: the interpreter has no
    benchmarker for the autotuner to time them with."""
    if torch.cuda.is_available():
        yield
        return
    import triton
    saved = []
    for name, module in list(sys.modules.items()):
        if name.startswith("fla."):
            for obj in list(vars(module).values()):
                while hasattr(obj, "fn"):
                    if isinstance(obj, triton.runtime.Autotuner):
                        saved.append((obj, obj.configs))
                        obj.configs = obj.configs[:1]
                    obj = obj.fn
    yield
    for tuner, configs in saved:
        tuner.configs = configs


def test_to_fla_pads_and_counts():
    blocks = torch.tensor([[[[0, -1, -1]], [[1, 0, -1]], [[2, 0, 1]]]], dtype=torch.int32)
    indices, counts = peers.to_fla(blocks)
    assert indices.shape == (1, 3, 1, 4) and indices.dtype == torch.int32 and indices.is_contiguous()
    assert torch.equal(indices[..., :3], blocks) and (indices[..., 3] == -1).all()
    assert counts.tolist() == [[[1], [2], [3]]]
    with pytest.raises(ValueError, match="valid entries must come first"):
        peers.to_fla(torch.tensor([[[[-1, 0]]]], dtype=torch.int32))


def test_fla_selected_attention_matches_msa(one_config_each):
    gen = torch.Generator().manual_seed(0)
    seqlen, heads, groups, dim, block_size, topk = 64, 16, 1, 16, 16, 3  # topk 3: padded to fla's power of two

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    q, k, v = randn(1, seqlen, heads, dim), randn(1, seqlen, groups, dim), randn(1, seqlen, groups, dim)
    blocks = msa.select_blocks(randn(1, seqlen, groups, 8), randn(1, seqlen, 1, 8), block_size=block_size, topk=topk)
    assert (blocks < 0).any() and (blocks >= 0).sum(-1).max() == topk  # padded rows and full rows
    fla_blocks, fla_counts = peers.to_fla(blocks)
    dout = randn(1, seqlen, heads, dim)
    results = []
    for run in (lambda q, k, v: msa.sparse_attention(q, k, v, blocks, block_size=block_size),
                lambda q, k, v: ParallelNSAFunction.apply(q, k, v, fla_blocks, fla_counts, block_size, dim ** -0.5,
                                                          None)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = run(*leaves)
        results.append((out, *torch.autograd.grad(out, leaves, dout)))
    for ours, theirs in zip(*results):
        assert peers.rel_err(theirs, ours) < 1e-5
