"""The Triton kernels against the float64 reference (MSA_BACKEND=triton).

On a CPU they run under TRITON_INTERPRET=1 (set by conftest.py) on small
shapes in float32/float16; on a GPU (scripts/gpu_check.sh) on larger shapes
in bfloat16/float16/float32. Every allocation made during a kernel call is
poisoned (NaN, or 2**30 for integers) so that unwritten outputs fail.
"""

import functools
import math
import warnings

import pytest
import torch

import msa
from helpers import assert_selection_matches, cu_seqlens_of, pack, poison_allocations, rand_inputs, rel_err, slow_except

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if ON_GPU else [torch.float32, torch.float16]
# ||out - ref|| / ||ref|| bounds (METHOD.md): tf32 dots on GPUs for float32 inputs.
BOUNDS = {torch.float32: 2e-3 if ON_GPU else 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# Near-ties of block scores that GPU runs may rank otherwise than the float64 reference; CPU runs match it exactly.
SELECTION_TOL = 1e-2 if ON_GPU else 0.0

# (batch, seqlen, heads, groups, head_dim, index_dim, block_size, topk)
if ON_GPU:
    SHAPES = [(2, 1000, 16, 2, 64, 64, 64, 4), (1, 2100, 8, 1, 128, 128, 128, 16), (1, 777, 32, 4, 128, 64, 64, 8),
              (2, 300, 4, 4, 64, 128, 16, 1), (1, 1500, 48, 8, 64, 64, 128, 32), (1, 1300, 8, 2, 64, 64, 256, 4)]
else:
    SHAPES = [(2, 70, 4, 2, 16, 16, 16, 3), (1, 90, 3, 3, 16, 32, 16, 2), (1, 50, 8, 2, 32, 16, 32, 1)]


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("MSA_BACKEND", "triton")
    poison_allocations(monkeypatch)


def bind(monkeypatch, launcher: str, **keywords):
    """Binds keyword arguments (a ``config``, a ``schedule``) of the launcher ``msa.kernels.<launcher>`` in the
    calls the ops make, which pass none."""
    from msa import kernels

    function = getattr(kernels, launcher)
    monkeypatch.setattr(kernels, launcher, functools.partial(getattr(function, "func", function), **keywords))


def inputs_for(shape, dtype, seed):
    batch, seqlen, heads, groups, head_dim, index_dim, _, _ = shape
    return rand_inputs(batch, seqlen, heads, groups, head_dim, index_dim, dtype=dtype, seed=seed, device=DEVICE)


@pytest.mark.parametrize("shape", slow_except(SHAPES, -1))
@pytest.mark.parametrize("dtype", slow_except(DTYPES, 0))
def test_select_blocks_kernel(shape, dtype):
    *_, index_q, index_k = inputs_for(shape, dtype, seed=21)
    block_size, topk = shape[6], shape[7]
    blocks, lse = msa.select_blocks(index_q, index_k, block_size=block_size, topk=topk, return_lse=True)
    assert_selection_matches(blocks, index_q, index_k, block_size, topk, tol=SELECTION_TOL)
    # the index LSE of a selection is the LSE of attention with index_q as queries and index_k as keys
    iq64, ik64 = index_q.double(), index_k.double().expand_as(index_q)
    _, ref_lse = msa.reference.sparse_attention(iq64, ik64, ik64, blocks, block_size=block_size, return_lse=True)
    assert lse.dtype == torch.float32 and rel_err(lse, ref_lse) < BOUNDS[dtype]


@pytest.mark.parametrize("shape", slow_except(SHAPES, -1))
def test_select_blocks_kernel_fp8(shape):
    """FP8 ranking: the exact selection of the FP8-rounded index vectors, whichever backend runs it."""
    *_, index_q, index_k = inputs_for(shape, torch.bfloat16 if ON_GPU else torch.float16, seed=23)
    block_size, topk = shape[6], shape[7]
    blocks = msa.select_blocks(index_q, index_k, block_size=block_size, topk=topk, index_dtype=torch.float8_e4m3fn)
    # products of FP8 values are exact; the sums round in float32 (more coarsely in Hopper's FP8 MMA)
    assert_selection_matches(blocks, msa.fp8.rounded(index_q), msa.fp8.rounded(index_k), block_size, topk,
                             tol=SELECTION_TOL)


@pytest.mark.parametrize("fp8", [False, True])
def test_indexer_in_chunks(fp8):
    """Packed sequences (one empty) through a workspace that holds a few query positions at a time: the
    selection of one chunk for all positions and, up to near-ties, of the reference."""
    from msa import kernels

    shape = SHAPES[0]
    seqlens = [shape[1], 0, shape[1] // 3]
    *_, index_q, index_k = rand_inputs(3, shape[1], *shape[2:6], dtype=DTYPES[-1], seed=27, device=DEVICE)
    index_q, index_k = pack(index_q, seqlens), pack(index_k, seqlens)
    cu_seqlens = cu_seqlens_of(seqlens, device=DEVICE)
    block_size, topk = shape[6], shape[7]
    scale = {}
    if fp8:  # the kernels take FP8 rows and the keys' scales; the reference, the rounded vectors
        (rank_q, _), (rank_k, scale["index_k_scale"]) = msa.fp8.quantize_rows(index_q), \
            msa.fp8.quantize_rows(index_k[:, 0])
        index_q, index_k = msa.fp8.rounded(index_q), msa.fp8.rounded(index_k)
    else:
        rank_q, rank_k = index_q, index_k
    args = (rank_q, rank_k, cu_seqlens, max(seqlens), block_size, topk)
    config = kernels.IndexerConfig(32, 4, 2, 32)  # 16 queries per program
    whole = kernels.select_blocks(*args, config, **scale)
    workspace_bytes = 3 * 4 * index_q.shape[1] * (max(seqlens) // block_size) * 20
    config = kernels.IndexerConfig(32, 4, 2, 32, workspace_bytes)
    blocks = kernels.select_blocks(*args, config, **scale)  # in chunks of 16 query positions
    assert torch.equal(blocks, whole)
    for piece_q, piece_k, piece in zip(*(x.split(seqlens) for x in (index_q, index_k, blocks))):
        if len(piece):
            assert_selection_matches(piece[None], piece_q[None], piece_k[None], block_size, topk, tol=SELECTION_TOL)


@pytest.mark.parametrize("n_blocks, topk, values", [(5, 3, 5), (200, 16, 200),
                                                    pytest.param(700, 32, 700, marks=pytest.mark.slow),
                                                    pytest.param(1100, 16, 1100, marks=pytest.mark.slow),
                                                    (64, 1, 64), (127, 16, 20), (300, 16, 3)])
def test_top_blocks(n_blocks, topk, values):
    """Phase 2 of the indexer alone on block scores with ties (``values`` distinct ones: about one tie per
    value, or so many that rows have more candidates than the kernel narrows to) and -inf: per row, the layout
    of ``msa.reference.rank_blocks`` (the blocks before the local one in (score descending, block ascending)
    order, then the local block, then -1); tokens outside the chunk untouched."""
    from msa import kernels

    block_size, groups, seqlens = 4, 2, [n_blocks * 4 + 3, n_blocks * 2]
    first, n_positions = n_blocks * 4 - 9, 11  # a chunk past the second sequence's end
    cu_seqlens = cu_seqlens_of(seqlens, device=DEVICE)
    gen = torch.Generator().manual_seed(n_blocks)
    scores = torch.randint(0, values, (len(seqlens), n_positions, groups, n_blocks), generator=gen).float()
    scores[torch.rand(scores.shape, generator=gen) < 0.2] = float("-inf")
    block_indices = torch.full((sum(seqlens), groups, topk), -7, dtype=torch.int32)
    got = block_indices.to(DEVICE)
    kernels.top_blocks(scores.to(DEVICE), cu_seqlens, got, first, n_positions, n_blocks, block_size)
    expected = block_indices.clone()
    for seq, (start, seqlen) in enumerate(zip([0, seqlens[0]], seqlens)):
        positions = torch.arange(first, max(first, min(seqlen, first + n_positions)))
        expected[start + positions] = msa.reference.rank_blocks(scores[seq, :len(positions)],
                                                                positions // block_size, topk).int()
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("n_pages, topk, values, narrow", [pytest.param(1600, 16, 1600, True, marks=pytest.mark.slow),
                                                           (1600, 16, 1600, False), (300, 8, 3, True),
                                                           pytest.param(130, 16, 130, True, marks=pytest.mark.slow),
                                                           (20, 4, 20, True), (6, 1, 6, False)])
def test_top_pages(n_pages, topk, values, narrow):
    """The paged Top-k on page scores with ties (``values`` distinct ones; 3: more candidates than the
    narrowing keeps, so the rounds run over whole rows), -inf pages and one +inf (local) page per row (the first
    and the last page among them), with and without the candidates scratch: per row, the layout of
    ``msa.reference.rank_blocks`` for that local page (pages after it ignored)."""
    from msa import kernels

    gen = torch.Generator().manual_seed(n_pages + topk)
    rows = 12
    scores = torch.randint(0, values, (rows, n_pages), generator=gen).float()
    scores[torch.rand(scores.shape, generator=gen) < 0.3] = float("-inf")
    local = torch.randint(0, n_pages, (rows,), generator=gen)
    local[:2] = torch.tensor([0, n_pages - 1])
    scores[torch.arange(rows), local] = float("inf")
    got = torch.full((rows, topk), -7, dtype=torch.int64, device=DEVICE)
    candidates = config = None
    if narrow:
        candidates = torch.full((max(1, kernels.top_pages_candidates_numel(rows, n_pages, topk)),), math.nan,
                                device=DEVICE)
        # narrowed however few the rows
        config = kernels.top_pages_config(rows, n_pages, topk, got.device, scratch=True, narrow_rows_per_sm=0)
    kernels.top_pages(scores.to(DEVICE), got, candidates, config)
    assert torch.equal(got.cpu(), msa.reference.rank_blocks(scores[:, None], local, topk)[:, 0])


def _reference_sparse(q, k, v, blocks, block_size, grad_out):
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out, lse = msa.reference.sparse_attention(q64, k64, v64, blocks, block_size=block_size, return_lse=True)
    grads = torch.autograd.grad(out, (q64, k64, v64), grad_out.double())
    return out, lse, grads


@pytest.fixture(params=["kv-outer forward, atomic dq", "query-outer forward, deterministic dq"])
def schedule(request, monkeypatch):
    """Both forward schedules and both dq paths of the backward."""
    kv_outer = request.param.startswith("kv")
    bind(monkeypatch, "sparse_attention_fwd", schedule="kv" if kv_outer else "query")
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(not kv_outer, warn_only=True)
    yield request.param
    torch.use_deterministic_algorithms(deterministic)


@pytest.mark.parametrize("shape", slow_except(SHAPES, -1))
@pytest.mark.parametrize("dtype", slow_except(DTYPES, 0))
def test_sparse_attention_kernels(shape, dtype, schedule):
    q, k, v, index_q, index_k = inputs_for(shape, dtype, seed=22)
    block_size, topk = shape[6], shape[7]
    blocks = msa.reference.select_blocks(index_q.double(), index_k.double(), block_size=block_size, topk=topk)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = msa.sparse_attention(q, k, v, blocks, block_size=block_size, return_lse=True)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_out, ref_lse, ref_grads = _reference_sparse(q, k, v, blocks, block_size, grad_out)
    bound = BOUNDS[dtype]
    assert out.dtype == dtype and rel_err(out, ref_out) < bound
    assert rel_err(lse, ref_lse) < bound
    for name, grad, ref in zip("qkv", grads, ref_grads):
        assert rel_err(grad, ref) < 2 * bound, f"d{name}"


HOPPER = ON_GPU and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not HOPPER, reason="the Gluon forward partials run on sm_90 GPUs")
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[4] in (64, 128) and s[6] in (64, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hopper_forward_partials(shape, dtype, monkeypatch):
    """On an H100/H200 the KV-outer forward's partials come from the Gluon kernel (it is the one launched; groups
    of 6 heads leave the last rows of each tile unused): outputs match the reference, and the Triton kernel's bit
    for bit."""
    from msa import kernels
    from msa.kernels import sparse_attention as attention_kernels

    bind(monkeypatch, "sparse_attention_fwd", schedule="kv")
    launched, launch = [], attention_kernels.launch
    monkeypatch.setattr(attention_kernels, "launch", lambda kernel, *args, **kw: launched.append(kernel) or launch(
        kernel, *args, **kw))
    q, k, v, index_q, index_k = inputs_for(shape, dtype, seed=27)
    block_size, topk = shape[6], shape[7]
    blocks = msa.reference.select_blocks(index_q.double(), index_k.double(), block_size=block_size, topk=topk)
    out, lse = msa.sparse_attention(q, k, v, blocks, block_size=block_size, return_lse=True)
    assert attention_kernels._gluon_hopper_kernel(q.device) in launched
    ref_out, ref_lse = msa.reference.sparse_attention(q.double(), k.double(), v.double(), blocks,
                                                      block_size=block_size, return_lse=True)
    assert rel_err(out, ref_out) < BOUNDS[dtype] and rel_err(lse, ref_lse) < BOUNDS[dtype]
    bind(monkeypatch, "sparse_attention_fwd", schedule="kv", config=kernels.SparseForwardConfig(hopper=False))
    triton_out, triton_lse = msa.sparse_attention(q, k, v, blocks, block_size=block_size, return_lse=True)
    assert launched[-1] is attention_kernels.sparse_attention_fwd_partial_kernel
    assert torch.equal(out, triton_out) and torch.equal(lse, triton_lse)


@pytest.mark.slow
def test_gluon_compile_failure_falls_back_with_one_warning(monkeypatch):
    """Gluon is experimental: where another Triton cannot compile the Hopper kernel, the forward warns once and runs
    the Triton kernel, exactly."""
    import triton
    from msa.kernels import sparse_attention as attention_kernels

    class Uncompilable:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise triton.compiler.errors.CompilationError(None, None, "an API this Triton lacks")
            return launch

    uncompilable = Uncompilable()
    monkeypatch.setattr(attention_kernels, "_gluon_hopper_kernel", lambda device: uncompilable)
    monkeypatch.setattr(attention_kernels, "_GLUON_FAILED", set())
    bind(monkeypatch, "sparse_attention_fwd", schedule="kv")
    shape = (1, 150, 8, 2, 64, 16, 64, 2)
    q, k, v, index_q, index_k = inputs_for(shape, torch.float16, seed=28)
    blocks = msa.reference.select_blocks(index_q.double(), index_k.double(), block_size=64, topk=2)
    with pytest.warns(UserWarning, match="Gluon forward partials do not compile"):
        out, lse = msa.sparse_attention(q, k, v, blocks, block_size=64, return_lse=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = msa.sparse_attention(q, k, v, blocks, block_size=64)
    assert not [w for w in caught if "Gluon" in str(w.message)]
    ref_out, ref_lse = msa.reference.sparse_attention(q.double(), k.double(), v.double(), blocks, block_size=64,
                                                      return_lse=True)
    assert rel_err(out, ref_out) < BOUNDS[torch.float16] and rel_err(lse, ref_lse) < BOUNDS[torch.float16]
    assert torch.equal(again, out)


SM_90_COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from msa.kernels.sparse_attention_hopper import sparse_attention_fwd_partial_hopper_kernel as kernel

types = dict(q="*bf16", k="*bf16", v="*bf16", cu_seqlens="*i32", csr_offsets="*i32", csr_entries="*i32",
             partial_out="*bf16", partial_lse="*fp32", scale_log2="fp32", n_block_slots="i32", token_offset="i32")
results = []
for head_dim, block_size, heads in json.loads(sys.argv[1]):
    constants = dict(HQ=4 * heads, G=4, R=heads, D=head_dim, BLOCK_SIZE=block_size, MAX_BLOCKS=1024, TOPK=16,
                     ROWS=64, QT=64 // heads, LIST_PARTS=8)
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    source = GluonASTSource(kernel, signature, {(kernel.arg_names.index(n),): c for n, c in constants.items()},
                            {(i,): [["tt.divisibility", 16]] for i in range(8)})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 64), options=dict(num_warps=4))
    results.append(dict(ptx=compiled.asm["ptx"], shared=compiled.metadata.shared))
print(json.dumps(results))
"""


@pytest.mark.slow
def test_hopper_forward_partials_compile_for_sm_90():
    """The Gluon kernel compiles for sm_90 without a GPU (triton.compile and ptxas, in a process without
    TRITON_INTERPRET: under the interpreter Triton's own reductions are interpreted functions Gluon cannot call),
    its q gathers as cp.async and its products as wgmma; the paper's shape fits two programs per SM (<= 113 KB of
    shared memory each)."""
    pytest.importorskip("triton.experimental.gluon")
    import json
    import os
    import subprocess
    import sys

    shapes = [(128, 128, 16), (64, 64, 8), (128, 64, 6)]
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SM_90_COMPILE, json.dumps(shapes)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout)
    for result in results:
        assert "cp.async.cg.shared.global" in result["ptx"] and "wgmma.mma_async" in result["ptx"]
    assert results[0]["shared"] <= 113 * 1024


@pytest.mark.parametrize("part_entries, parts", [pytest.param(1, 8, marks=pytest.mark.slow), (2**30, 1)])
def test_kv_outer_forward_list_parts(part_entries, parts, monkeypatch):
    """The KV-outer forward's (group, block) lists walked in 8 parts or whole by one program: exact both
    ways (which one a chunk takes depends on how many entries its lists hold)."""
    from msa import kernels
    from msa.kernels import sparse_attention as attention_kernels

    bind(monkeypatch, "sparse_attention_fwd", schedule="kv",
         config=kernels.SparseForwardConfig(part_entries=part_entries))
    grids, launch = [], attention_kernels.launch

    def recording_launch(kernel, grid, *args, **kwargs):
        grids.append(grid)
        launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(attention_kernels, "launch", recording_launch)
    shape, dtype = SHAPES[0], DTYPES[0]
    q, k, v, index_q, index_k = inputs_for(shape, dtype, seed=25)
    block_size, topk = shape[6], shape[7]
    blocks = msa.reference.select_blocks(index_q.double(), index_k.double(), block_size=block_size, topk=topk)
    out, lse = msa.sparse_attention(q, k, v, blocks, block_size=block_size, return_lse=True)
    ref_out, ref_lse = msa.reference.sparse_attention(q.double(), k.double(), v.double(), blocks,
                                                      block_size=block_size, return_lse=True)
    assert [grid[2] for grid in grids] == [parts]
    assert rel_err(out, ref_out) < BOUNDS[dtype] and rel_err(lse, ref_lse) < BOUNDS[dtype]


@pytest.mark.slow
@pytest.mark.parametrize("max_lists, one_sort", [(2**24, True), (1, False)])
def test_kv_outer_forward_in_query_chunks(max_lists, one_sort, monkeypatch):
    """A partials workspace of 23 tokens: the forward runs in query chunks that cut through blocks and sequences,
    their lists built by one sort (or one per chunk past ``max_csr_lists``); outputs, LSEs and the KL loss (whose
    teacher takes the LSE-only pass) match the reference."""
    from msa import kernels
    from msa.kernels import block_csr

    shape, dtype = SHAPES[0], DTYPES[0]
    heads, head_dim, block_size, topk = shape[2], shape[4], shape[6], shape[7]
    config = kernels.SparseForwardConfig(workspace_bytes=23 * heads * topk * (4 + head_dim * dtype.itemsize),
                                         max_csr_lists=max_lists)
    bind(monkeypatch, "sparse_attention_fwd", schedule="kv", config=config)
    bind(monkeypatch, "index_kl_fwd", config=kernels.IndexKLConfig(teacher=config))
    builds, build = [], block_csr.build_block_csr

    def counting_build(*args, **kwargs):
        builds.append(1)
        return build(*args, **kwargs)

    monkeypatch.setattr(block_csr, "build_block_csr", counting_build)
    seqlens = [shape[1] // 2, 0, shape[1] - 3]
    q, k, v, index_q, index_k = rand_inputs(3, shape[1], *shape[2:6], dtype=dtype, seed=26, device=DEVICE)
    packed = [pack(x, seqlens) for x in (q, k, v, index_q, index_k)]
    cu_seqlens = cu_seqlens_of(seqlens, device=DEVICE)
    blocks = msa.reference.select_blocks(*(x.double() for x in packed[3:]), block_size=block_size, topk=topk,
                                         cu_seqlens=cu_seqlens)
    out, lse = msa.sparse_attention(*packed[:3], blocks, block_size=block_size, cu_seqlens=cu_seqlens,
                                    return_lse=True)
    assert len(builds) == (1 if one_sort else -(-sum(seqlens) // 23))
    ref_out, ref_lse = msa.reference.sparse_attention(*(x.double() for x in packed[:3]), blocks,
                                                      block_size=block_size, cu_seqlens=cu_seqlens, return_lse=True)
    assert rel_err(out, ref_out) < BOUNDS[dtype] and rel_err(lse, ref_lse) < BOUNDS[dtype]
    kl = msa.index_kl_loss(*packed[:2], *packed[3:], blocks, block_size=block_size, cu_seqlens=cu_seqlens)
    ref_kl = msa.reference.index_kl_loss(*(x.double() for x in packed[:2] + packed[3:]), blocks,
                                         block_size=block_size, cu_seqlens=cu_seqlens)
    assert rel_err(kl, ref_kl) < BOUNDS[dtype]


@pytest.mark.parametrize("with_gradients", [True, False])
def test_the_kl_loss_inverts_its_selection_once(with_gradients, monkeypatch):
    """The teacher's LSE pass and the KL kernels walk the same (group, block) lists, built once (one query chunk
    holds every query at this size); the loss and its gradients still match the reference."""
    from msa.kernels import block_csr

    builds, build = [], block_csr.build_block_csr

    def counting_build(*args, **kwargs):
        builds.append(1)
        return build(*args, **kwargs)

    monkeypatch.setattr(block_csr, "build_block_csr", counting_build)
    shape, dtype = SHAPES[-1], DTYPES[0]
    block_size, topk = shape[6], shape[7]
    q, k, _, index_q, index_k = inputs_for(shape, dtype, seed=31)
    blocks = msa.reference.select_blocks(index_q.double(), index_k.double(), block_size=block_size, topk=topk)
    index_q, index_k = index_q.requires_grad_(with_gradients), index_k.requires_grad_(with_gradients)
    loss = msa.index_kl_loss(q, k, index_q, index_k, blocks, block_size=block_size)
    assert len(builds) == 1
    iq64, ik64 = (x.detach().double().requires_grad_() for x in (index_q, index_k))
    ref = msa.reference.index_kl_loss(q.double(), k.double(), iq64, ik64, blocks, block_size=block_size)
    assert rel_err(loss, ref) < BOUNDS[dtype]
    if with_gradients:
        grads, ref_grads = torch.autograd.grad(loss, (index_q, index_k)), torch.autograd.grad(ref, (iq64, ik64))
        assert all(rel_err(grad, ref_grad) < BOUNDS[dtype] for grad, ref_grad in zip(grads, ref_grads))


@pytest.mark.parametrize("shape", slow_except(SHAPES, -1))
@pytest.mark.parametrize("dtype", slow_except(DTYPES, 0))
@pytest.mark.parametrize("give_main_lse", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("schedule", ["kv-outer forward, atomic dq",
                                      pytest.param("query-outer forward, deterministic dq", marks=pytest.mark.slow)],
                         indirect=True)
def test_index_kl_kernels(shape, dtype, give_main_lse, schedule):
    q, k, v, index_q, index_k = inputs_for(shape, dtype, seed=23)
    block_size, topk = shape[6], shape[7]
    blocks = msa.reference.select_blocks(index_q.double(), index_k.double(), block_size=block_size, topk=topk)
    main_lse = msa.sparse_attention(q, k, v, blocks, block_size=block_size, return_lse=True)[1] if give_main_lse else None
    index_q, index_k = index_q.requires_grad_(), index_k.requires_grad_()
    loss = msa.index_kl_loss(q, k, index_q, index_k, blocks, block_size=block_size, main_lse=main_lse)
    grads = torch.autograd.grad(loss, (index_q, index_k))
    iq64, ik64 = (x.detach().double().requires_grad_() for x in (index_q, index_k))
    ref = msa.reference.index_kl_loss(q.double(), k.double(), iq64, ik64, blocks, block_size=block_size)
    ref_grads = torch.autograd.grad(ref, (iq64, ik64))
    bound = BOUNDS[dtype]
    assert rel_err(loss, ref) < bound
    # without gradients the loss alone is computed (the fused pass computes both)
    loss_only = msa.index_kl_loss(q, k, index_q.detach(), index_k.detach(), blocks, block_size=block_size,
                                  main_lse=main_lse)
    assert rel_err(loss_only, ref) < bound
    # the gradient sums r - p over up to topk * block_size keys, which cancel: a looser bound
    for name, grad, ref_grad in zip(("index_q", "index_k"), grads, ref_grads):
        assert grad.dtype == dtype and rel_err(grad, ref_grad) < 3 * bound, name


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES[:1])
def test_kernels_varlen_with_empty_sequence(dtype, schedule):
    shape = SHAPES[0]
    seqlens = [shape[1] // 2, 0, shape[1] - 3]
    q, k, v, index_q, index_k = rand_inputs(3, shape[1], *shape[2:6], dtype=dtype, seed=24, device=DEVICE)
    packed = [pack(x, seqlens) for x in (q, k, v, index_q, index_k)]
    cu_seqlens = cu_seqlens_of(seqlens, device=DEVICE)
    block_size, topk = shape[6], shape[7]
    blocks = msa.select_blocks(packed[3], packed[4], block_size=block_size, topk=topk, cu_seqlens=cu_seqlens)
    ref_blocks = msa.reference.select_blocks(*(x.double() for x in packed[3:]), block_size=block_size, topk=topk,
                                             cu_seqlens=cu_seqlens)
    assert torch.equal(blocks.sort(-1).values, ref_blocks.sort(-1).values)
    q_, k_, v_ = (x.requires_grad_() for x in packed[:3])
    out = msa.sparse_attention(q_, k_, v_, blocks, block_size=block_size, cu_seqlens=cu_seqlens)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q_, k_, v_), grad_out)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in packed[:3])
    ref = msa.reference.sparse_attention(q64, k64, v64, blocks, block_size=block_size, cu_seqlens=cu_seqlens)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    assert rel_err(out, ref) < BOUNDS[dtype]
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_err(grad, ref_grad) < 2 * BOUNDS[dtype]
    kl = msa.index_kl_loss(*packed[:2], *packed[3:], blocks, block_size=block_size, cu_seqlens=cu_seqlens)
    ref_kl = msa.reference.index_kl_loss(*(x.double() for x in packed[:2] + packed[3:]), blocks,
                                         block_size=block_size, cu_seqlens=cu_seqlens)
    assert rel_err(kl, ref_kl) < BOUNDS[dtype]


@pytest.mark.skipif(not ON_GPU, reason="needs tensors of more than 2**31 elements")
def test_offsets_past_2_to_31_elements():
    """A short sequence packed after a long one: its q, out and dq rows lie past 2**31 elements."""
    seqlens = [2**18 + 1024, 1500]
    heads, groups, dim, block_size, topk = 64, 4, 128, 128, 16
    q, k, v, index_q, index_k = (x[0] for x in rand_inputs(1, sum(seqlens), heads, groups, dim, dim,
                                                           dtype=torch.bfloat16, seed=26, device=DEVICE))
    cu_seqlens = cu_seqlens_of(seqlens, device=DEVICE)
    blocks = msa.select_blocks(index_q, index_k, block_size=block_size, topk=topk, cu_seqlens=cu_seqlens)
    q.requires_grad_()
    out = msa.sparse_attention(q, k, v, blocks, block_size=block_size, cu_seqlens=cu_seqlens)
    grad_out = torch.randn_like(out)
    (dq,) = torch.autograd.grad(out, q, grad_out)
    short = slice(seqlens[0], None)
    q64 = q[short].detach().double().requires_grad_()
    ref = msa.reference.sparse_attention(q64[None], k[short].double()[None], v[short].double()[None],
                                         blocks[short][None], block_size=block_size)[0]
    (ref_dq,) = torch.autograd.grad(ref, q64, grad_out[short].double())
    assert rel_err(out[short], ref) < BOUNDS[torch.bfloat16]
    assert rel_err(dq[short], ref_dq) < 2 * BOUNDS[torch.bfloat16]


def test_unsupported_shape_falls_back_with_one_warning():
    q, k, v, index_q, index_k = rand_inputs(1, 40, 2, 1, 8, 8, dtype=torch.float32, seed=25, device=DEVICE)
    blocks = msa.reference.select_blocks(index_q, index_k, block_size=8, topk=2)
    with pytest.warns(UserWarning, match="do not support head dim 8"):
        out = msa.sparse_attention(q, k, v, blocks, block_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        msa.sparse_attention(q, k, v, blocks, block_size=8)  # warned once already
    assert rel_err(out, msa.reference.sparse_attention(q.double(), k.double(), v.double(), blocks, block_size=8)) < 1e-5


def test_fp8_index_products_of_narrow_index_heads_take_the_pytorch_path():
    """Hopper's FP8 products need K >= 32: CUDA calls with a smaller index head dim fall back (seen on an H100)."""
    from msa.ops.backend import unsupported_reason

    reason = unsupported_reason(dtype=torch.bfloat16, index_dim=16, block_size=16, topk=2,
                                fp8_device=torch.device("cuda"))
    assert "index head dim 16" in reason
    assert unsupported_reason(dtype=torch.bfloat16, index_dim=16, block_size=16, topk=2) is None


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("MSA_BACKEND", "cuda")
    *_, index_q, index_k = rand_inputs(1, 16, 2, 1, 16, 16, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="MSA_BACKEND must be one of"):
        msa.select_blocks(index_q, index_k, block_size=16)


# --------------------------------------------------------------------------- deterministic=


def _spy_backward_launchers(monkeypatch) -> list:
    """Records ``(launcher, deterministic)`` for each call the ops make of the backward launchers (the fused KL pass,
    ``index_kl_fwd_bwd``, accumulates with atomics: False)."""
    from msa import kernels

    calls = []
    for name in ("sparse_attention_bwd", "index_kl_bwd", "index_kl_fwd_bwd"):
        def spy(*args, _name=name, _launcher=getattr(kernels, name), **kwargs):
            calls.append((_name, kwargs.get("deterministic", False)))
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    return calls


def _step_gradients(inputs, selection, grad_out, deterministic):
    """The gradients of a training step's sparse attention (upstream ``grad_out``) and KL loss through the public
    ops, in q, k, v, index_q, index_k."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out, lse = msa.sparse_attention(*leaves[:3], selection, return_lse=True, deterministic=deterministic)
    kl = msa.index_kl_loss(*leaves[:2], *leaves[3:], selection, main_lse=lse, deterministic=deterministic)
    return torch.autograd.grad((out, kl), leaves, (grad_out, torch.ones((), device=out.device)))


@pytest.mark.parametrize("global_flag, argument, expected", [
    (False, True, True),  # the argument overrides torch's setting, both ways
    (True, False, False),
    pytest.param(True, None, True, marks=pytest.mark.slow),  # None follows it
    pytest.param(False, None, False, marks=pytest.mark.slow),
])
def test_the_deterministic_argument_picks_the_backward_variant(monkeypatch, global_flag, argument, expected):
    """``deterministic=True`` launches the backward passes without atomics (and no fused KL pass) whatever
    ``torch.use_deterministic_algorithms`` says, False the fast ones; the gradients match the float64 reference, and
    the deterministic ones are bitwise the same from run to run (the interpreter here; on a GPU see
    test_deterministic_gradients_are_bitwise_identical_run_to_run)."""
    inputs = rand_inputs(1, 32, 2, 1, 16, 16, dtype=torch.float32, seed=28, device=DEVICE)
    selection = msa.select_blocks(*inputs[3:], block_size=16, topk=2, return_selection=True)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator(DEVICE).manual_seed(29), device=DEVICE)
    calls = _spy_backward_launchers(monkeypatch)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(global_flag)
    try:
        grads = _step_gradients(inputs, selection, grad_out, argument)
        kl_launcher = "index_kl_bwd" if expected else "index_kl_fwd_bwd"
        assert sorted(calls) == sorted([("sparse_attention_bwd", expected), (kl_launcher, expected)])
        if expected:
            again = _step_gradients(inputs, selection, grad_out, argument)
            assert all(torch.equal(a, b) for a, b in zip(grads, again))
    finally:
        torch.use_deterministic_algorithms(previous)
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    ref_out = msa.reference.sparse_attention(*leaves[:3], selection.block_indices, block_size=16)
    ref_kl = msa.reference.index_kl_loss(*leaves[:2], *leaves[3:], selection.block_indices, block_size=16)
    ref_grads = torch.autograd.grad((ref_out, ref_kl), leaves, (grad_out.double(), torch.ones((), device=DEVICE)))
    bound = BOUNDS[torch.float32]
    for name, grad, ref in zip(("q", "k", "v", "index_q", "index_k"), grads, ref_grads):
        assert rel_err(grad, ref) < 3 * bound, f"d{name}"


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="run-to-run determinism of the GPU kernels needs a GPU")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_deterministic_gradients_are_bitwise_identical_run_to_run(monkeypatch, backend):
    """On a GPU, in bf16 at a moderate shape, with torch's deterministic algorithms off: the gradients of a training
    step with ``deterministic=True`` are bitwise the same in every run (the Triton kernels without atomics; the
    PyTorch path accumulating rows in sorted order)."""
    monkeypatch.setenv("MSA_BACKEND", backend)
    assert not torch.are_deterministic_algorithms_enabled()
    inputs = rand_inputs(2, 4096, 16, 2, 128, 64, dtype=torch.bfloat16, seed=30, device=DEVICE)
    selection = msa.select_blocks(*inputs[3:], block_size=64, topk=16, return_selection=True)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator(DEVICE).manual_seed(31), device=DEVICE,
                           dtype=torch.bfloat16)
    first = _step_gradients(inputs, selection, grad_out, True)
    for _ in range(3):
        again = _step_gradients(inputs, selection, grad_out, True)
        for name, a, b in zip(("q", "k", "v", "index_q", "index_k"), first, again):
            assert torch.equal(a, b), f"d{name} differs from run to run"
