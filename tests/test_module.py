"""msa.MSAAttention: shapes, modes, detach rules, varlen, and that it trains."""

import pytest
import torch
from torch import nn

import msa
from helpers import cu_seqlens_of, rel_err
from msa.nn import RotaryEmbedding


class ToyModel(nn.Module):
    def __init__(self, vocab=16, hidden=64, mode="sparse"):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.rotary = RotaryEmbedding(16)
        self.attn = msa.MSAAttention(hidden, 4, 2, 16, index_head_dim=16, block_size=16, topk=2, mode=mode)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        hidden = self.embed(tokens)
        out, kl = self.attn(hidden, self.rotary(positions))
        return self.head(hidden + out), kl


def arithmetic_task(batch, seqlen, vocab=16, seed=0):
    """Sequences ``start + stride * t (mod vocab)``: the next token needs the stride, read off earlier tokens."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    stride = torch.randint(1, 4, (batch, 1), generator=gen)
    return (start + stride * torch.arange(seqlen)) % vocab


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_module_trains_both_losses_down(mode):
    """25 steps of LM loss alone (the teacher settles), then 25 with LM + KL: both losses fall."""
    torch.manual_seed(0)
    model = ToyModel(mode=mode)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    lm_losses, kl_losses = [], []
    for step in range(50):
        tokens = arithmetic_task(8, 128, seed=step)
        logits, kl = model(tokens)
        lm = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        kl_weight = 0.0 if step < 25 else 1.0
        optimizer.zero_grad()
        (lm + kl_weight * kl).backward()
        optimizer.step()
        lm_losses.append(lm.item())
        kl_losses.append(kl.item())
    assert sum(lm_losses[-3:]) < 0.2 * sum(lm_losses[:3]), lm_losses
    assert sum(kl_losses[-3:]) < 0.6 * sum(kl_losses[25:28]), kl_losses


def _layer_inputs(batch=2, seqlen=50, hidden=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seqlen, hidden, generator=gen)
    return x, RotaryEmbedding(16)(torch.arange(seqlen).expand(batch, -1))


def test_kl_loss_trains_only_the_index_branch():
    layer = msa.MSAAttention(64, 4, 2, 16, index_head_dim=8, block_size=8, topk=2).train()
    x, rope = _layer_inputs()
    x.requires_grad_()
    _, kl = layer(x, rope)
    kl.backward()
    assert x.grad is None, "the Index Branch must read a detached copy of the hidden states"
    for name, param in layer.named_parameters():
        trained = param.grad is not None and param.grad.abs().sum() > 0
        assert trained == name.startswith("index_branch."), name


def test_lm_loss_never_reaches_the_index_branch():
    layer = msa.MSAAttention(64, 4, 2, 16, index_head_dim=8, block_size=8, topk=2)
    x, rope = _layer_inputs()
    out, kl = layer(x, rope, compute_kl_loss=False)
    assert kl is None
    out.square().sum().backward()
    assert all(param.grad is None for param in layer.index_branch.parameters())
    assert layer.q_proj.weight.grad.abs().sum() > 0


def test_dense_mode_equals_sparse_mode_when_topk_covers_everything():
    layer = msa.MSAAttention(64, 4, 2, 16, index_head_dim=8, block_size=8, topk=7).eval()
    x, rope = _layer_inputs()
    sparse, _ = layer(x, rope)
    layer.set_mode("dense")
    dense, _ = layer(x, rope)
    assert rel_err(sparse, dense) < 1e-5


def test_varlen_layer_equals_batched():
    layer = msa.MSAAttention(64, 4, 2, 16, index_head_dim=8, block_size=8, topk=2).train()
    x, (cos, sin) = _layer_inputs()
    batched, batched_kl = layer(x, (cos, sin))
    cu_seqlens = cu_seqlens_of([50, 50])
    packed, packed_kl = layer(x.flatten(0, 1), (cos.flatten(0, 1), sin.flatten(0, 1)), cu_seqlens=cu_seqlens)
    assert rel_err(packed, batched.flatten(0, 1)) < 1e-5
    assert rel_err(packed_kl, batched_kl) < 1e-5


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_kl_topk_widens_only_the_kl_support(mode):
    """With kl_topk the output is unchanged and the KL loss is the one over the top kl_topk blocks."""
    torch.manual_seed(0)
    kwargs = dict(index_head_dim=8, block_size=8, topk=1, mode=mode)
    layer = msa.MSAAttention(64, 4, 2, 16, **kwargs).train()
    wide = msa.MSAAttention(64, 4, 2, 16, kl_topk=4, **kwargs).train()
    wide.load_state_dict(layer.state_dict())
    x, rope = _layer_inputs()
    (out, kl), (wide_out, wide_kl) = layer(x, rope), wide(x, rope)
    assert torch.equal(out, wide_out)
    q, k, _, index_q, index_k = _projections(wide, x, rope)
    blocks = msa.select_blocks(index_q, index_k, block_size=8, topk=4)
    expected = msa.reference.index_kl_loss(q.double(), k.double(), index_q.double(), index_k.double(), blocks,
                                           block_size=8)
    assert rel_err(wide_kl.double(), expected) < 1e-5
    assert rel_err(kl, wide_kl) > 1e-2  # the supports differ enough for the check above to tell them apart
    with pytest.raises(ValueError, match="kl_topk must be None or an int >= topk"):
        msa.MSAAttention(64, 4, 2, 16, **dict(kwargs, topk=2), kl_topk=1)


def _projections(layer, x, rope):
    """The rotated q, k, v, index_q, index_k the layer computes from ``x`` (caught through its ``attend`` hook)."""
    caught = []

    def catch(*tensors):
        caught.extend(tensors)
        return torch.zeros_like(tensors[0])

    layer(x, rope, attend=catch)
    return caught


def test_fp8_index_ranking_selects_on_the_rounded_index_vectors():
    """index_dtype=float8_e4m3fn: the layer attends over the reference selection of the FP8-rounded vectors."""
    layer = msa.MSAAttention(64, 4, 2, 16, index_head_dim=16, block_size=8, topk=2, index_dtype=torch.float8_e4m3fn)
    x, rope = _layer_inputs(seed=3)
    q, k, v, index_q, index_k = _projections(layer, x, rope)
    blocks = msa.reference.select_blocks(index_q.double(), index_k.double(), block_size=8, topk=2,
                                         index_dtype=torch.float8_e4m3fn)
    bf16_blocks = msa.reference.select_blocks(index_q.double(), index_k.double(), block_size=8, topk=2)
    assert not torch.equal(blocks.sort(-1).values, bf16_blocks.sort(-1).values)  # this case tells them apart
    ref = msa.reference.sparse_attention(q.double(), k.double(), v.double(), blocks, block_size=8)
    out, _ = layer(x, rope)
    assert rel_err(out, layer.o_proj(ref.float().flatten(-2))) < 1e-5


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="mode must be one of"):
        msa.MSAAttention(64, 4, 2, index_head_dim=8, mode="fast")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        msa.MSAAttention(64, 4, 3, index_head_dim=8)
    with pytest.raises(ValueError, match="index_rope needs an even index_head_dim"):
        msa.MSAAttention(64, 4, 2, 16, index_head_dim=32)


def test_state_dicts_saved_before_the_index_branch_was_a_submodule_still_load():
    """``attention.index_q_proj.weight`` (the old name) loads into ``attention.index_branch.index_q_proj.weight``."""
    config = msa.nn.MSAConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                              intermediate_size=64, index_head_dim=8, block_size=8, topk=2)
    torch.manual_seed(0)
    saved = msa.nn.MSATransformer(config)
    old_names = {name.replace("index_branch.", ""): tensor for name, tensor in saved.state_dict().items()}
    assert "layers.1.attention.index_k_proj.weight" in old_names
    torch.manual_seed(1)
    loaded = msa.nn.MSATransformer(config)
    loaded.load_state_dict(old_names)  # strict: every key found a parameter
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), loaded.state_dict().values()))


def test_a_selector_replaces_the_selection_and_the_kl_loss():
    """``index_branch.selector``: the layer attends over the selector's blocks (the float64 reference over them) and
    computes no KL loss."""
    layer = msa.MSAAttention(64, 4, 2, 16, index_head_dim=8, block_size=8, topk=2).train()
    x, rope = _layer_inputs(seed=4)
    q, k, v, _, _ = _projections(layer, x, rope)
    local = (torch.arange(50) // 8).int().view(1, 50, 1, 1).expand(2, 50, 2, 1)  # each query's own block only
    layer.index_branch.selector = lambda q, k, index_q, index_k: local
    out, kl = layer(x, rope)
    ref = msa.reference.sparse_attention(q.double(), k.double(), v.double(), local, block_size=8)
    assert kl is None and rel_err(out, layer.o_proj(ref.float().flatten(-2))) < 1e-5
    layer.index_branch.selector = None
    assert rel_err(layer(x, rope)[0], out) > 1e-2  # the Index Branch's own selection is another one


# --------------------------------------------------------------------------- deterministic=, input validation


@pytest.mark.parametrize("deterministic", [None, True, False])
def test_the_layer_passes_its_deterministic_setting_to_the_ops(monkeypatch, deterministic):
    from msa.nn import index_branch

    seen = []
    for name in ("sparse_attention", "index_kl_loss"):
        def spy(*args, _op=getattr(index_branch, name), _name=name, **kwargs):
            seen.append((_name, kwargs["deterministic"]))
            return _op(*args, **kwargs)

        monkeypatch.setattr(index_branch, name, spy)
    layer = msa.MSAAttention(64, 4, 2, 16, index_head_dim=8, block_size=8, topk=2,
                             deterministic=deterministic).train()
    assert layer.deterministic is deterministic
    out, kl = layer(*_layer_inputs())
    (out.square().mean() + kl).backward()
    assert seen == [("sparse_attention", deterministic), ("index_kl_loss", deterministic)]
    with pytest.raises(TypeError, match="deterministic must be None or a bool"):
        msa.MSAAttention(64, 4, 2, 16, index_head_dim=8, deterministic="yes")


def _packed_inputs():
    x, (cos, sin) = _layer_inputs()
    return dict(x=x.flatten(0, 1), rope=(cos.flatten(0, 1), sin.flatten(0, 1)), cu_seqlens=cu_seqlens_of([50, 50]))


def _bad(*, x=None, rope=None, packed=False, **kwargs):
    """A call of the layer with the valid inputs (batched, or packed with ``cu_seqlens``) but what ``x``, ``rope``
    (functions of the valid ones) and ``kwargs`` replace."""
    def call(layer):
        inputs = _packed_inputs() if packed else dict(zip(("x", "rope"), _layer_inputs()))
        hidden = inputs["x"] if x is None else x(inputs["x"])
        embeddings = inputs["rope"] if rope is None else rope(inputs["rope"])
        extra = dict(cu_seqlens=inputs["cu_seqlens"]) if packed else {}
        return layer(hidden, embeddings, **{**extra, **kwargs})

    return call


def _cu(*bounds, dtype=torch.int32):
    return torch.tensor(bounds, dtype=dtype)


BAD_LAYER_INPUTS = [
    ("hidden_states list", _bad(x=lambda x: x.tolist()), TypeError, "hidden_states must be a torch.Tensor"),
    ("hidden_states rank", _bad(x=lambda x: x[None]), ValueError, r"hidden_states must have shape \[B, S, hidden\]"),
    ("hidden_states packed without cu_seqlens", _bad(x=lambda x: x[0]), ValueError,
     r"hidden_states must have shape \[B, S, hidden\] \(or \[T, hidden\] with cu_seqlens\)"),
    ("hidden_states width", _bad(x=lambda x: x[..., :32]), ValueError, "hidden_states must have shape .* hidden=64"),
    ("hidden_states int", _bad(x=lambda x: x.int()), TypeError, "hidden_states must have dtype in"),
    ("hidden_states dtype", _bad(x=lambda x: x.double()), TypeError,
     "hidden_states must have dtype torch.float32 like the layer's parameters"),
    ("hidden_states device", _bad(x=lambda x: x.to("meta")), ValueError, "hidden_states must be on cpu"),
    ("position_embeddings one table", _bad(rope=lambda rope: rope[:1]), TypeError,
     r"position_embeddings must be a \(cos, sin\) pair"),
    ("position_embeddings None", _bad(rope=lambda rope: None), TypeError,
     r"position_embeddings must be a \(cos, sin\)"),
    ("position_embeddings head dim", _bad(rope=lambda rope: (rope[0][..., :8], rope[1])), ValueError,
     r"position_embeddings \(cos\) must have shape \[2, 50, 16\]"),
    ("position_embeddings length", _bad(rope=lambda rope: (rope[0], rope[1][:, :49])), ValueError,
     r"position_embeddings \(sin\) must have shape"),
    ("position_embeddings dtype", _bad(rope=lambda rope: (rope[0].long(), rope[1])), TypeError,
     r"position_embeddings \(cos\) must have dtype in"),
    ("position_embeddings device", _bad(rope=lambda rope: (rope[0], rope[1].to("meta"))), ValueError,
     r"position_embeddings \(sin\) must be on cpu"),
    ("hidden_states batched with cu_seqlens", _bad(cu_seqlens=_cu(0, 50, 100)), ValueError,
     r"hidden_states must have shape \[T, hidden\] when cu_seqlens is given"),
    ("cu_seqlens list", _bad(packed=True, cu_seqlens=[0, 50, 100]), TypeError,
     "cu_seqlens must be an int32 or int64 torch.Tensor"),
    ("cu_seqlens float", _bad(packed=True, cu_seqlens=_cu(0, 50, 100, dtype=torch.float32)), TypeError,
     "cu_seqlens must have dtype int32 or int64"),
    ("cu_seqlens rank", _bad(packed=True, cu_seqlens=_cu(0, 50, 100)[None]), ValueError,
     r"cu_seqlens must have shape \[n \+ 1\]"),
    ("cu_seqlens start", _bad(packed=True, cu_seqlens=_cu(1, 50, 100)), ValueError,
     "cu_seqlens must start at 0 and end at T=100 .the tokens of hidden_states"),
    ("cu_seqlens end", _bad(packed=True, cu_seqlens=_cu(0, 50, 90)), ValueError, "cu_seqlens must start at 0 and end"),
    ("cu_seqlens order", _bad(packed=True, cu_seqlens=_cu(0, 60, 40, 100)), ValueError,
     "cu_seqlens must be non-decreasing"),
    ("cu_seqlens device", _bad(packed=True, cu_seqlens=_cu(0, 50, 100).to("meta")), ValueError,
     "cu_seqlens must be on cpu like hidden_states"),
    ("compute_kl_loss", _bad(compute_kl_loss="yes"), TypeError, "compute_kl_loss must be None or a bool"),
    ("attend", _bad(attend=1), TypeError, "attend must be callable"),
    ("prefix not a KeyPrefix", _bad(prefix=torch.zeros(2, 4, 2, 16)), TypeError, "prefix must be a KeyPrefix"),
    ("prefix k shape", _bad(prefix=msa.nn.KeyPrefix(torch.zeros(2, 4, 3, 16), torch.zeros(2, 4, 2, 16),
                                                    torch.zeros(2, 4, 1, 8))), ValueError,
     r"prefix.k must have shape \[B=2, P=4, 2, 16\]"),
    ("prefix index_k length", _bad(prefix=msa.nn.KeyPrefix(torch.zeros(2, 4, 2, 16), torch.zeros(2, 4, 2, 16),
                                                           torch.zeros(2, 5, 1, 8))), ValueError,
     r"prefix.index_k must have shape \[B=2, P=4, 1, 8\]"),
    ("prefix packed", _bad(packed=True, prefix=msa.nn.KeyPrefix(*(torch.zeros(1),) * 3)), ValueError,
     "prefix takes the dense layout"),
]


@pytest.mark.parametrize("call, error, message", [case[1:] for case in BAD_LAYER_INPUTS],
                         ids=[case[0] for case in BAD_LAYER_INPUTS])
def test_the_layer_rejects_bad_input_naming_the_argument(call, error, message):
    layer = msa.MSAAttention(64, 4, 2, 16, index_head_dim=8, block_size=8, topk=2).train()
    with pytest.raises(error, match=message):
        call(layer)


def test_the_layer_takes_int64_cu_seqlens_and_broadcast_rotary_tables():
    layer = msa.MSAAttention(64, 4, 2, 16, index_head_dim=8, block_size=8, topk=2).train()
    inputs = _packed_inputs()
    out, kl = layer(inputs["x"], inputs["rope"], cu_seqlens=inputs["cu_seqlens"])
    out64, kl64 = layer(inputs["x"], inputs["rope"], cu_seqlens=inputs["cu_seqlens"].long())
    assert torch.equal(out, out64) and torch.equal(kl, kl64)
    x, (cos, sin) = _layer_inputs()
    assert torch.equal(layer(x, (cos[:1], sin[:1]))[0], layer(x, (cos, sin))[0])  # [1, S, D] broadcasts over B


BAD_INDEX_BRANCH_INPUTS = [
    ("hidden_states width", lambda x, rope: (x[..., :32], rope), ValueError, "hidden_states must have shape"),
    ("hidden_states dtype", lambda x, rope: (x.double(), rope), TypeError, "hidden_states must have dtype"),
    ("position_embeddings", lambda x, rope: (x, None), TypeError, r"position_embeddings must be a \(cos, sin\)"),
]


@pytest.mark.parametrize("corrupt, error, message", [case[1:] for case in BAD_INDEX_BRANCH_INPUTS],
                         ids=[case[0] for case in BAD_INDEX_BRANCH_INPUTS])
def test_the_index_branch_rejects_bad_input_naming_the_argument(corrupt, error, message):
    branch = msa.nn.IndexBranch(64, 2, 8, head_dim=16, block_size=8, topk=2)
    with pytest.raises(error, match=message):
        branch(*corrupt(*_layer_inputs()))


def _model_call(ids=None, **kwargs):
    def call(model):
        tokens = torch.randint(0, 32, (2, 20)) if ids is None else ids
        return model(tokens, **kwargs)

    return call


BAD_MODEL_INPUTS = [
    ("input_ids float", _model_call(torch.zeros(2, 20)), TypeError, r"input_ids must have dtype in \(int32, int64\)"),
    ("input_ids rank", _model_call(torch.zeros(2, 20, 1, dtype=torch.long)), ValueError,
     r"input_ids must have shape \[B, S\]"),
    ("input_ids packed without cu_seqlens", _model_call(torch.zeros(20, dtype=torch.long)), ValueError,
     r"input_ids must have shape \[B, S\] \(or \[T\] with cu_seqlens\)"),
    ("input_ids device", _model_call(torch.zeros(2, 20, dtype=torch.long, device="meta")), ValueError,
     "input_ids must be on cpu"),
    ("position_ids shape", _model_call(position_ids=torch.arange(20)), ValueError,
     r"position_ids must have shape \[2, 20\] like input_ids"),
    ("position_ids dtype", _model_call(position_ids=torch.zeros(2, 20)), TypeError, "position_ids must have dtype"),
    ("cu_seqlens end", _model_call(torch.zeros(40, dtype=torch.long), cu_seqlens=_cu(0, 20, 30)), ValueError,
     r"cu_seqlens must start at 0 and end at T=40 \(the tokens of input_ids\)"),
    ("cu_seqlens dtype", _model_call(torch.zeros(40, dtype=torch.long), cu_seqlens=_cu(0, 20, 40, dtype=torch.int16)),
     TypeError, "cu_seqlens must have dtype int32 or int64"),
]


@pytest.mark.parametrize("call, error, message", [case[1:] for case in BAD_MODEL_INPUTS],
                         ids=[case[0] for case in BAD_MODEL_INPUTS])
def test_the_transformer_rejects_bad_input_naming_the_argument(call, error, message):
    config = msa.nn.MSAConfig(vocab_size=32, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                              intermediate_size=64, index_head_dim=8, block_size=8, topk=2)
    with pytest.raises(error, match=message):
        call(msa.nn.MSATransformer(config))


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_a_sequence_in_chunks_against_the_key_prefix_equals_it_whole(mode):
    """Consecutive query chunks (not block-aligned), each attending to the keys of the chunks before it
    (``prefix``, ``return_keys``), give the whole sequence's output, KL loss (the chunks' row-weighted mean) and
    gradients of every parameter and of the hidden states, in float64."""
    torch.manual_seed(0)
    layer = msa.MSAAttention(64, 4, 2, 16, index_head_dim=8, block_size=8, topk=3, kl_topk=4, mode=mode)
    layer = layer.double().train()
    x, (cos, sin) = _layer_inputs(seqlen=45)
    x, cos, sin = x.double().requires_grad_(), cos.double(), sin.double()
    whole, whole_kl = layer(x, (cos, sin))
    whole_grads = torch.autograd.grad(whole.square().sum() + whole_kl, [x, *layer.parameters()])

    outputs, kl_total, keys = [], 0.0, None
    for start, end in ((0, 11), (11, 12), (12, 30), (30, 45)):
        out, kl, keys = layer(x[:, start:end], (cos[:, start:end], sin[:, start:end]), prefix=keys,
                              return_keys=True)
        assert keys.k.shape[1] == end
        outputs.append(out)
        kl_total = kl_total + kl * (end - start) / 45
    chunked = torch.cat(outputs, dim=1)
    chunked_grads = torch.autograd.grad(chunked.square().sum() + kl_total, [x, *layer.parameters()])
    assert rel_err(chunked, whole) < 1e-12
    assert abs(kl_total - whole_kl).item() < 1e-12
    names = ["hidden_states", *(name for name, _ in layer.named_parameters())]
    for name, grad, expected in zip(names, chunked_grads, whole_grads):
        assert rel_err(grad, expected) < 1e-10, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 kernels need a GPU")
def test_a_sequence_in_chunks_against_the_key_prefix_equals_it_whole_in_bf16_on_the_gpu():
    """The same on the device in bf16 through the Triton kernels, at a shape where the selection is sparse: the
    chunked run and the whole one agree to bf16 rounding (outputs, KL loss, gradients)."""
    torch.manual_seed(0)
    seqlen = 1000
    layer = msa.MSAAttention(256, 8, 2, 64, index_head_dim=32, block_size=64, topk=4, kl_topk=8)
    layer = layer.to("cuda", torch.bfloat16).train()
    x = torch.randn(1, seqlen, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = (t.to("cuda", torch.bfloat16) for t in RotaryEmbedding(64)(torch.arange(seqlen)[None]))
    whole, whole_kl = layer(x, (cos, sin))
    grad_out = torch.randn_like(whole)
    whole_grads = torch.autograd.grad((whole * grad_out).sum() + whole_kl, [x, *layer.parameters()])

    outputs, kl_total, keys = [], 0.0, None
    for start, end in ((0, 300), (300, 301), (301, 700), (700, seqlen)):
        out, kl, keys = layer(x[:, start:end], (cos[:, start:end], sin[:, start:end]), prefix=keys,
                              return_keys=True)
        outputs.append(out)
        kl_total = kl_total + kl * (end - start) / seqlen
    chunked = torch.cat(outputs, dim=1)
    chunked_grads = torch.autograd.grad((chunked * grad_out).sum() + kl_total, [x, *layer.parameters()])
    assert rel_err(chunked, whole) < 2e-2
    assert rel_err(kl_total, whole_kl) < 2e-2
    names = ["hidden_states", *(name for name, _ in layer.named_parameters())]
    for name, grad, expected in zip(names, chunked_grads, whole_grads):
        assert rel_err(grad, expected) < 5e-2, name
