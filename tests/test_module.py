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
