"""msa.inference: the paged KV cache, plan()/run() prefill and MTP decode, CUDA graphs, the generator.

Every step's outputs are checked against the whole sequence: the selection
against the float64 reference scores, the attention against the float64
reference on that selection, and both against the public ops run on the
whole sequence at once. Both backends: the PyTorch path and the Triton
kernels (under the interpreter without a GPU); outputs poisoned with NaN.
"""

import math

import pytest
import torch

import msa
from helpers import assert_selection_matches, poison_allocations, rand_inputs, rel_err, slow_except
from msa.inference import DenseKVAttention, PagedKVCache, PagedSparseAttention
from msa.inference.generate import Generator
from msa.nn import MSAConfig, MSATransformer

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
BOUNDS = {torch.float32: 2e-3 if ON_GPU else 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# Near-ties of block scores that GPU runs may rank otherwise than the float64 reference; CPU runs match it exactly.
SELECTION_TOL = 1e-2 if ON_GPU else 0.0

# (heads, groups, head_dim, index_dim, block_size, topk), request lengths, prefill chunk, decode tokens per step
if ON_GPU:
    SHAPES = [(64, 4, 128, 128, 128, 16), (12, 4, 64, 128, 64, 8), (16, 2, 64, 64, 128, 4)]
    LENGTHS, CHUNK, DECODE = [2600, 1500, 700], 1000, 8
    DTYPES = [torch.bfloat16, torch.float16]
else:
    SHAPES = [(4, 2, 16, 16, 16, 3), (6, 2, 16, 32, 16, 2), (8, 1, 32, 16, 32, 4)]
    LENGTHS, CHUNK, DECODE = [90, 61, 40], 23, 3
    DTYPES = [torch.float32, torch.float16]


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("MSA_BACKEND", request.param)
    poison_allocations(monkeypatch)
    return request.param


def schedule(lengths, chunk, decode):
    """Steps of (request, new tokens): interleaved prefill chunks, then decode steps, ragged at the end."""
    steps, done = [], [0] * len(lengths)
    prefill_ends = [max(1, n - 2 * decode - r) for r, n in enumerate(lengths)]
    while any(d < e for d, e in zip(done, prefill_ends)):
        step = [(r, min(chunk, e - d)) for r, (d, e) in enumerate(zip(done, prefill_ends)) if d < e]
        steps.append(step)
        for r, n in step:
            done[r] += n
    while any(d < n for d, n in zip(done, lengths)):
        step = [(r, min(decode, n - d)) for r, (d, n) in enumerate(zip(done, lengths)) if d < n]
        steps.append(step)
        for r, n in step:
            done[r] += n
    return steps


def serve(shape, dtype, lengths, chunk, decode, seed, index_dtype=None, **attention_options):
    """Runs the schedule through one layer; returns the full sequences and, per request, the outputs and
    selections that the steps produced for every position, and the index keys the cache holds."""
    heads, groups, head_dim, index_dim, block_size, topk = shape
    sequences = [rand_inputs(1, n, heads, groups, head_dim, index_dim, dtype=dtype, seed=seed + r, device=DEVICE)
                 for r, n in enumerate(lengths)]
    pages_per_request = max(topk, math.ceil(max(lengths) / block_size))
    cache = PagedKVCache(num_layers=2, num_pages=len(lengths) * pages_per_request, block_size=block_size,
                         num_kv_heads=groups, head_dim=head_dim, index_head_dim=index_dim,
                         max_requests=len(lengths) + 1, max_pages_per_request=pages_per_request, dtype=dtype,
                         index_dtype=index_dtype, device=DEVICE)
    attention = PagedSparseAttention(cache, num_heads=heads, topk=topk, **attention_options)
    slot = [cache.add_request() for _ in lengths]
    outs = [torch.full((n, heads, head_dim), math.nan, dtype=dtype, device=DEVICE) for n in lengths]
    blocks = [torch.full((n, groups, topk), 2**30, dtype=torch.int64, device=DEVICE) for n in lengths]
    done = [0] * len(lengths)
    for step in schedule(lengths, chunk, decode):
        attention.plan([slot[r] for r, _ in step], [n for _, n in step])
        new = [torch.cat([sequences[r][i][0, done[r]:done[r] + n] for r, n in step]) for i in range(5)]
        out, block_indices = attention.run(1, *new, return_block_indices=True)
        first = 0
        for r, n in step:
            outs[r][done[r]:done[r] + n] = out[first:first + n]
            blocks[r][done[r]:done[r] + n] = block_indices[first:first + n]
            first, done[r] = first + n, done[r] + n
    stored = [cache.index_keys(1, torch.tensor(cache.pages(slot[r]), device=DEVICE))[:n] for r, n in enumerate(lengths)]
    return sequences, outs, blocks, stored


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", slow_except(DTYPES, 0))
@pytest.mark.parametrize("kv_splits", [None, 3])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)], indirect=True)
def test_chunked_prefill_and_decode_match_the_whole_sequence(backend, shape, dtype, kv_splits):
    block_size, topk = shape[4], shape[5]
    sequences, outs, blocks, _ = serve(shape, dtype, LENGTHS, CHUNK, DECODE, seed=40, kv_splits=kv_splits)
    for (q, k, v, index_q, index_k), out, selected in zip(sequences, outs, blocks):
        assert_selection_matches(selected[None].int(), index_q, index_k, block_size, topk, tol=SELECTION_TOL)
        ref = msa.reference.sparse_attention(q.double(), k.double(), v.double(), selected[None], block_size=block_size)
        assert rel_err(out[None], ref) < BOUNDS[dtype]
        # the public ops on the whole sequence at once
        whole = msa.sparse_attention(q, k, v, msa.select_blocks(index_q, index_k, block_size=block_size, topk=topk),
                                     block_size=block_size)
        assert rel_err(out[None], whole) < 2 * BOUNDS[dtype]


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
def test_attention_tiles_match_the_whole_sequence(shape, monkeypatch):
    """Tiles of 8 tokens walking the distinct blocks of their union, with split-KV: the same results."""
    monkeypatch.setenv("MSA_BACKEND", "triton")
    poison_allocations(monkeypatch)
    block_size, dtype = shape[4], DTYPES[0]
    sequences, outs, blocks, _ = serve(shape, dtype, LENGTHS, CHUNK, DECODE, seed=42, kv_splits=3,
                                       attention_tokens=8)
    for (q, k, v, _, _), out, selected in zip(sequences, outs, blocks):
        ref = msa.reference.sparse_attention(q.double(), k.double(), v.double(), selected[None], block_size=block_size)
        assert rel_err(out[None], ref) < BOUNDS[dtype]


def test_decode_steps_that_fill_the_gpu_take_wide_attention_tiles(monkeypatch):
    """The attention tile choice on an H100-sized GPU (132 SMs), G=4: a request's decode tokens share a tile
    once their programs (tiles x groups) cover at least half the SMs; prefill chunks and small batches take
    one token per tile; an explicit ``attention_tokens`` wins. Only the choice runs here (no kernel)."""
    from msa import kernels

    cache = PagedKVCache(num_layers=1, num_pages=4, block_size=16, num_kv_heads=4, head_dim=16, index_head_dim=16,
                         max_requests=2, dtype=torch.float32)
    monkeypatch.setattr(cache, "device", torch.device("cuda"))
    wide = kernels.PAGED_ATTENTION_TOKENS

    def tokens(q_lens, **options):
        attention = PagedSparseAttention(cache, num_heads=8, topk=2, **options)
        monkeypatch.setattr(attention, "_sm_count", lambda: 132)
        attention.q_lens = q_lens
        return attention._attention_tokens()

    assert tokens([8] * 16) == 1  # 64 programs
    assert tokens([8] * 17) == wide  # 68 programs
    assert tokens([8] * 31 + [17]) == 1  # a prefill chunk in the step
    assert tokens([8] * 17, attention_tokens=2) == 2


def test_index_scan_takes_fewer_pages_per_program_when_few_programs_would_run():
    from msa.kernels.paged import _scan_pages

    assert _scan_pages(16, 1, n_tiles=1, max_pages=250, min_programs=264) == 1  # 250 programs: down to one page
    assert _scan_pages(16, 1, n_tiles=4, max_pages=250, min_programs=264) == 2  # 500 programs
    assert _scan_pages(32, 2, n_tiles=1, max_pages=8, min_programs=264) == 2  # never below one product
    assert _scan_pages(16, 1, n_tiles=8, max_pages=1024, min_programs=264) == 16  # 512 programs: as configured


@pytest.mark.parametrize("config", slow_except([(1, 1, 4, 1), (2, 1, 4, 2), (4, 2, 4, 2), (8, 2, 4, 3)], -1))
def test_index_scan_launch_shapes_give_the_same_scores(config):
    """Pages per program and per product only change the work split: every page's score is the same."""
    from msa import kernels

    heads, groups, head_dim, index_dim, block_size, _ = SHAPES[0]
    cache = PagedKVCache(num_layers=1, num_pages=40, block_size=block_size, num_kv_heads=groups, head_dim=head_dim,
                         index_head_dim=index_dim, max_requests=2, max_pages_per_request=20, dtype=DTYPES[0],
                         device=DEVICE)
    cache.index_k.normal_()
    attention = PagedSparseAttention(cache, num_heads=heads, topk=2)
    requests = [cache.add_request() for _ in range(2)]
    for request, cached in zip(requests, (19 * block_size - 3, 7 * block_size + 5)):
        cache.reserve(request, cached)
    attention.plan(requests, [3, 3])
    tiles = torch.tensor(attention.work_tiles(kernels.PAGED_SCAN_TOKENS), dtype=torch.int32, device=DEVICE)
    index_q = torch.randn(6, groups, index_dim, dtype=DTYPES[0], device=DEVICE)
    scores = [torch.full((6 * groups, 20), math.nan, device=DEVICE) for _ in range(2)]
    for out, launch in zip(scores, (None, kernels.PagedScanConfig(*config))):
        kernels.paged_block_scores(index_q, cache.index_k[0], cache.page_table, tiles, out, 0,
                                   kernels.PAGED_SCAN_TOKENS, config=launch)
    assert not scores[0].isnan().any()
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index_dtype", [None, torch.float8_e4m3fn])
def test_append_writes_strided_rows_at_their_slots(index_dtype):
    """The one-launch append: K and V read through their own token strides (views), G * D not a power of two,
    each row at its slot and nothing else written; FP8 index keys rounded as the PyTorch path rounds them."""
    from msa import kernels

    dtype, groups, head_dim, index_dim, block_size = DTYPES[0], 3, 16, 32, 16
    cache = PagedKVCache(num_layers=1, num_pages=4, block_size=block_size, num_kv_heads=groups, head_dim=head_dim,
                         index_head_dim=index_dim, max_requests=1, dtype=dtype, index_dtype=index_dtype, device=DEVICE)
    expected = PagedKVCache(num_layers=1, num_pages=4, block_size=block_size, num_kv_heads=groups, head_dim=head_dim,
                            index_head_dim=index_dim, max_requests=1, dtype=dtype, index_dtype=index_dtype,
                            device=DEVICE)
    for pools in ((cache.k, cache.v, cache.index_k), (expected.k, expected.v, expected.index_k)):
        for pool in pools:
            pool.view(torch.uint8).fill_(7)
    if index_dtype is not None:
        cache.index_scale.fill_(3.0)
        expected.index_scale.fill_(3.0)
    k = torch.randn(21, 2, groups, head_dim, dtype=dtype, device=DEVICE)[:, 0]  # token stride 2 * G * D
    v = torch.randn(21, groups + 1, head_dim, dtype=dtype, device=DEVICE)[:, 1:]  # token stride (G + 1) * D
    index_k = torch.randn(21, index_dim, dtype=dtype, device=DEVICE)
    slots = torch.randperm(4 * block_size, device=DEVICE)[:21]
    kernels.paged_append(k, v, index_k, slots, cache.k[0].view(-1, groups * head_dim),
                         cache.v[0].view(-1, groups * head_dim), cache.index_k[0].view(-1, index_dim),
                         None if index_dtype is None else cache.index_scale[0].view(-1))
    expected.k[0].view(-1, groups, head_dim).index_copy_(0, slots, k)
    expected.v[0].view(-1, groups, head_dim).index_copy_(0, slots, v)
    expected.write_index_keys(0, slots, index_k)
    for pool, expected_pool in ((cache.k, expected.k), (cache.v, expected.v), (cache.index_k, expected.index_k)):
        assert torch.equal(pool.view(torch.uint8), expected_pool.view(torch.uint8))
    if index_dtype is not None:
        assert torch.equal(cache.index_scale, expected.index_scale)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)], indirect=True)
def test_long_chunks_run_in_bounded_score_parts(backend):
    """A score workspace of a few rows splits each prefill chunk into parts: same result."""
    shape, dtype = SHAPES[0], DTYPES[0]
    _, outs, blocks, _ = serve(shape, dtype, LENGTHS, CHUNK, DECODE, seed=41)
    _, part_outs, part_blocks, _ = serve(shape, dtype, LENGTHS, CHUNK, DECODE, seed=41, score_workspace_bytes=1)
    for out, part_out, selected, part_selected in zip(outs, part_outs, blocks, part_blocks):
        assert torch.equal(selected, part_selected)
        assert rel_err(part_out, out) < 1e-6


def test_torch_path_runs_long_chunks_in_query_parts(monkeypatch):
    """The PyTorch path bounds each chunk's index logits and gathered keys by running its queries in parts."""
    monkeypatch.setenv("MSA_BACKEND", "torch")
    shape, dtype = SHAPES[0], DTYPES[0]
    _, outs, blocks, _ = serve(shape, dtype, LENGTHS, CHUNK, DECODE, seed=42)
    monkeypatch.setattr(msa.inference.paged_torch, "_CHUNK_ELEMENTS", 1)  # one query per part
    _, part_outs, part_blocks, _ = serve(shape, dtype, LENGTHS, CHUNK, DECODE, seed=42)
    for out, part_out, selected, part_selected in zip(outs, part_outs, blocks, part_blocks):
        assert torch.equal(selected, part_selected)
        assert rel_err(part_out, out) < 1e-6


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)], indirect=True)
def test_fp8_index_keys_select_exactly_on_the_rounded_vectors(backend, shape):
    """An FP8 index-key cache holds the FP8 rounding of the keys (msa.fp8); the selection is the exact one for
    the rounded keys and queries, and the attention the exact one over that selection."""
    block_size, topk, dtype = shape[4], shape[5], DTYPES[0]
    sequences, outs, blocks, stored = serve(shape, dtype, LENGTHS, CHUNK, DECODE, seed=43,
                                            index_dtype=torch.float8_e4m3fn)
    for (q, k, v, index_q, index_k), out, selected, stored_keys in zip(sequences, outs, blocks, stored):
        assert stored_keys.dtype == torch.float32
        assert rel_err(stored_keys, msa.fp8.rounded(index_k[0, :, 0])) < 1e-6
        assert 0 < rel_err(stored_keys, index_k[0, :, 0]) < 0.06
        assert_selection_matches(selected[None].int(), msa.fp8.rounded(index_q), stored_keys[None, :, None],
                                 block_size, topk, tol=SELECTION_TOL)
        ref = msa.reference.sparse_attention(q.double(), k.double(), v.double(), selected[None], block_size=block_size)
        assert rel_err(out[None], ref) < BOUNDS[dtype]


def test_index_dtype_is_checked():
    with pytest.raises(ValueError, match="index_dtype must be None"):
        PagedKVCache(num_layers=1, num_pages=2, block_size=16, num_kv_heads=1, head_dim=16, index_head_dim=16,
                     max_requests=1, dtype=torch.float32, index_dtype=torch.float16)
    with pytest.raises(ValueError, match="index_dtype must be None"):
        msa.select_blocks(torch.randn(1, 16, 1, 16), torch.randn(1, 16, 1, 16), block_size=16, topk=1,
                          index_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="index_dtype must be None or 'float8_e4m3fn'"):
        MSAConfig(index_dtype="int8")


def test_cache_pages_are_reused_after_free():
    cache = PagedKVCache(num_layers=1, num_pages=6, block_size=16, num_kv_heads=1, head_dim=16, index_head_dim=16,
                         max_requests=2, max_pages_per_request=4, dtype=torch.float32)
    first, second = cache.add_request(), cache.add_request()
    assert cache.reserve(first, 40) == 0 and cache.reserve(first, 1) == 40 and cache.seq_lens[first] == 41
    cache.reserve(second, 33)
    assert cache.free_pages == 0 and sorted(cache.pages(first) + cache.pages(second)) == list(range(6))
    assert cache.page_table[first, :3].tolist() == cache.pages(first)
    assert cache.slots(first, 15, 17).tolist() == [cache.pages(first)[0] * 16 + 15, cache.pages(first)[1] * 16]
    with pytest.raises(RuntimeError, match="out of KV-cache pages"):
        cache.reserve(second, 16)
    with pytest.raises(RuntimeError, match="request slots"):
        cache.add_request()
    cache.free(first)
    assert cache.free_pages == 3
    third = cache.add_request()
    with pytest.raises(ValueError, match="max_pages_per_request"):
        cache.reserve(third, 65)
    with pytest.raises(ValueError, match="not an active request"):
        cache.reserve(first + 5, 1)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)], indirect=True)
def test_plan_that_does_not_fit_changes_nothing(backend):
    """A plan whose later request finds no free pages, passes max_pages_per_request or is not active raises
    before reserving any: lengths, pages, free pages and page table as they were, no step planned; the next
    step that fits (the last free pages exactly) runs as if the failed plans never happened."""
    heads, groups, head_dim, index_dim, block_size, topk = SHAPES[0]
    dtype = DTYPES[0]
    cache = PagedKVCache(num_layers=1, num_pages=8, block_size=block_size, num_kv_heads=groups, head_dim=head_dim,
                         index_head_dim=index_dim, max_requests=3, max_pages_per_request=4, dtype=dtype, device=DEVICE)
    attention = PagedSparseAttention(cache, num_heads=heads, topk=topk)
    requests = [cache.add_request() for _ in range(3)]
    steps = [[block_size + 2, block_size, 5], [block_size, 3, 2 * block_size]]  # 4 pages, then the other 4
    lengths = [sum(q_lens) for q_lens in zip(*steps)]
    sequences = [rand_inputs(1, n, heads, groups, head_dim, index_dim, dtype=dtype, seed=50 + r, device=DEVICE)
                 for r, n in enumerate(lengths)]
    outs = [torch.full((n, heads, head_dim), math.nan, dtype=dtype, device=DEVICE) for n in lengths]
    blocks = [torch.full((n, groups, topk), 2**30, dtype=torch.int64, device=DEVICE) for n in lengths]
    done = [0] * len(requests)

    def step(q_lens):
        attention.plan(requests, q_lens)
        new = [torch.cat([seq[i][0, d:d + n] for seq, d, n in zip(sequences, done, q_lens)]) for i in range(5)]
        out, block_indices = attention.run(0, *new, return_block_indices=True)
        first = 0
        for r, n in enumerate(q_lens):
            outs[r][done[r]:done[r] + n] = out[first:first + n]
            blocks[r][done[r]:done[r] + n] = block_indices[first:first + n]
            first, done[r] = first + n, done[r] + n

    def snapshot():
        return list(cache.seq_lens), [cache.pages(r) for r in requests], cache.free_pages, cache.page_table.clone()

    step(steps[0])
    before = snapshot()
    first, second, third = requests
    failing = [([first, second, third], [block_size, block_size + 1, 3 * block_size], RuntimeError,
                "out of KV-cache pages: request 2 needs 3 more, 1 free"),
               ([first, second], [1, 4 * block_size], ValueError, "request 1 would hold 80 tokens"),
               ([first, 3], [1, 1], ValueError, "request 3 is not an active request")]
    for plan_requests, q_lens, error, message in failing:
        with pytest.raises(error, match=message):
            attention.plan(plan_requests, q_lens)
        seq_lens, pages, free_pages, page_table = snapshot()
        assert (seq_lens, pages, free_pages) == before[:3] and torch.equal(page_table, before[3])
        with pytest.raises(RuntimeError, match="no step is planned"):
            attention.run(0, *(x[0, :1] for x in sequences[0]))
    step(steps[1])
    assert cache.free_pages == 0 and cache.seq_lens[:3] == lengths
    for (q, k, v, index_q, index_k), out, selected in zip(sequences, outs, blocks):
        assert_selection_matches(selected[None].int(), index_q, index_k, block_size, topk, tol=SELECTION_TOL)
        ref = msa.reference.sparse_attention(q.double(), k.double(), v.double(), selected[None], block_size=block_size)
        assert rel_err(out[None], ref) < BOUNDS[dtype]


def test_freed_pages_hold_stale_values_that_never_leak(backend):
    """A request reusing another's pages sees only its own tokens, whatever the pages held."""
    shape, dtype = SHAPES[0], DTYPES[0]
    heads, groups, head_dim, index_dim, block_size, topk = shape
    cache = PagedKVCache(num_layers=1, num_pages=4, block_size=block_size, num_kv_heads=groups, head_dim=head_dim,
                         index_head_dim=index_dim, max_requests=1, max_pages_per_request=4, dtype=dtype, device=DEVICE)
    cache.k.fill_(1e4)
    cache.v.fill_(math.nan)
    cache.index_k.fill_(1e4)
    attention = PagedSparseAttention(cache, num_heads=heads, topk=topk)
    request = cache.add_request()
    n = block_size + 3
    q, k, v, index_q, index_k = rand_inputs(1, n, heads, groups, head_dim, index_dim, dtype=dtype, seed=3,
                                            device=DEVICE)
    attention.plan([request], [n])
    out = attention.run(0, q[0], k[0], v[0], index_q[0], index_k[0])
    blocks = msa.reference.select_blocks(index_q.double(), index_k.double(), block_size=block_size, topk=topk)
    ref = msa.reference.sparse_attention(q.double(), k.double(), v.double(), blocks, block_size=block_size)
    assert rel_err(out[None], ref) < BOUNDS[dtype]


def test_run_validates_its_inputs():
    cache = PagedKVCache(num_layers=1, num_pages=4, block_size=16, num_kv_heads=2, head_dim=16, index_head_dim=16,
                         max_requests=2, dtype=torch.float32)
    for tokens in (0, 17):
        with pytest.raises(ValueError, match="attention_tokens must be in 1..16"):
            PagedSparseAttention(cache, num_heads=4, topk=2, attention_tokens=tokens)
    attention = PagedSparseAttention(cache, num_heads=4, topk=2)
    request = cache.add_request()
    tensors = [torch.randn(5, *s) for s in ((4, 16), (2, 16), (2, 16), (2, 16), (1, 16))]
    with pytest.raises(RuntimeError, match="plan"):
        attention.run(0, *tensors)
    attention.plan([request], [5])
    with pytest.raises(ValueError, match=r"q must have shape \[5, 4, 16\]"):
        attention.run(0, torch.randn(6, 4, 16), *tensors[1:])
    with pytest.raises(ValueError, match="index_q must be torch.float32"):
        attention.run(0, *tensors[:3], tensors[3].double(), tensors[4])
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        attention.run(0, *tensors[:2], None, *tensors[3:])
    with pytest.raises(ValueError, match="layer must be in 0..0"):
        attention.run(1, *tensors)
    with pytest.raises(ValueError, match="q_lens must be >= 1"):
        attention.plan([request], [0])
    with pytest.raises(ValueError, match="distinct"):
        attention.plan([request, request], [1, 1])
    with pytest.raises(ValueError, match="multiple of"):
        PagedSparseAttention(cache, num_heads=3)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_decode_step_replays_as_a_cuda_graph():
    """Capture one MTP decode step of 32 requests; after the next plan, replay it on new tokens: the result
    equals an eager run of the same step."""
    heads, groups, head_dim, index_dim, block_size, topk = SHAPES[0]
    batch, q_len, dtype = 32, 8, torch.bfloat16
    cache = PagedKVCache(num_layers=1, num_pages=batch * 40, block_size=block_size, num_kv_heads=groups,
                         head_dim=head_dim, index_head_dim=index_dim, max_requests=batch, max_pages_per_request=40,
                         dtype=dtype, device=DEVICE)
    attention = PagedSparseAttention(cache, num_heads=heads, topk=topk)
    requests = [cache.add_request() for _ in range(batch)]
    gen = torch.Generator(device=DEVICE).manual_seed(5)

    def tokens(n):
        shapes = ((heads, head_dim), (groups, head_dim), (groups, head_dim), (groups, index_dim), (index_dim,))
        return [torch.randn(n, *s, generator=gen, device=DEVICE, dtype=dtype) for s in shapes]

    attention.plan(requests, [100 + 97 * r for r in range(batch)])  # prompts of different lengths
    attention.run(0, *tokens(sum(100 + 97 * r for r in range(batch))))
    attention.plan(requests, [q_len] * batch)
    static = tokens(batch * q_len)
    attention.run(0, *static)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = attention.run(0, *static)
    attention.plan(requests, [q_len] * batch)  # the next step: same shapes, positions moved on
    for x, fresh in zip(static, tokens(batch * q_len)):
        x.copy_(fresh)
    graph.replay()
    replayed = graph_out.clone()
    eager = attention.run(0, *static).clone()  # rewrites the same slots with the same values
    assert torch.equal(replayed, eager)


@pytest.mark.parametrize("index_dtype", [None, pytest.param("float8_e4m3fn", marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend_name", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_generator_logits_match_a_full_recompute(backend_name, index_dtype, monkeypatch):
    """Also with FP8 index ranking: the cache's FP8 index keys rank as the model's own FP8 selection does."""
    monkeypatch.setenv("MSA_BACKEND", backend_name)
    config = MSAConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=128, index_head_dim=16, block_size=16, topk=3, index_dtype=index_dtype)
    torch.manual_seed(0)
    model = MSATransformer(config).to(DEVICE).eval()
    prompt = torch.randint(0, config.vocab_size, (150,)).tolist()
    generator = Generator(model, max_seq_len=200, chunk_size=64)
    assert generator.cache.index_k.dtype == (torch.float8_e4m3fn if index_dtype else torch.float32)
    tokens, logits = generator.generate(prompt, max_new_tokens=6)
    assert generator.cache.free_pages == generator.cache.k.shape[1]  # the request's pages went back
    with torch.no_grad():
        full = model(torch.tensor(prompt + tokens[:-1], device=DEVICE)[None], compute_kl_loss=False)[0][0]
    assert rel_err(logits, full[len(prompt) - 1:]) < 1e-4
    assert tokens == full[len(prompt) - 1:].argmax(-1).tolist()


def test_dense_generator_matches_the_dense_model():
    """The baseline: dense attention over a contiguous cache, chunked prefill and decode = the model in dense mode."""
    config = MSAConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=128, index_head_dim=16, block_size=16, topk=3, mode="dense")
    torch.manual_seed(0)
    model = MSATransformer(config).to(DEVICE).eval()
    prompt = torch.randint(0, config.vocab_size, (150,)).tolist()
    generator = Generator(model, max_seq_len=200, chunk_size=64, dense=True)
    assert not generator.cuda_graphs
    tokens, logits = generator.generate(prompt, max_new_tokens=6)
    with torch.no_grad():
        full = model(torch.tensor(prompt + tokens[:-1], device=DEVICE)[None], compute_kl_loss=False)[0][0]
    assert rel_err(logits, full[len(prompt) - 1:]) < 1e-4
    assert tokens == full[len(prompt) - 1:].argmax(-1).tolist()
    with pytest.raises(ValueError, match="cuda_graphs=True needs"):
        Generator(model, dense=True, cuda_graphs=True)


def test_dense_attention_checks_its_requests():
    attention = DenseKVAttention(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, max_requests=1,
                                 max_seq_len=10, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="plan"):
        attention.run(0, *(torch.zeros(1, h, 8) for h in (4, 2, 2, 2, 1)))
    request = attention.add_request()
    with pytest.raises(RuntimeError, match="request slots are in use"):
        attention.add_request()
    with pytest.raises(ValueError, match="more than max_seq_len"):
        attention.plan([request], [11])
    with pytest.raises(ValueError, match="not an active request"):
        attention.plan([request + 1], [1])
    attention.free(request)
    with pytest.raises(ValueError, match="not an active request"):
        attention.free(request)


def test_pages_allocated_at_admission_are_used_first():
    cache = PagedKVCache(num_layers=1, num_pages=8, block_size=16, num_kv_heads=1, head_dim=16, index_head_dim=16,
                         max_requests=3, dtype=torch.float32)
    first = cache.add_request(capacity=40)
    second = cache.add_request(capacity=20)
    assert cache.pages(first) == [0, 1, 2] and cache.pages(second) == [3, 4] and cache.seq_lens[first] == 0
    cache.reserve(first, 48)
    assert cache.pages(first) == [0, 1, 2] and cache.seq_lens[first] == 48
    cache.reserve(first, 1)
    assert cache.pages(first) == [0, 1, 2, 5]
    with pytest.raises(RuntimeError, match="out of KV-cache pages"):
        cache.add_request(capacity=16 * 3)
    assert cache.add_request() == 2  # the failed admission left its slot free
