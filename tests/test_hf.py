"""msa.integrations.hf: GQA decoders of the Hugging Face families made MSA in place."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from msa.integrations import hf  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 MSA kernels on a GPU multiply in tf32; the PyTorch path on a CPU is float32-exact
TOL = 3e-3 if DEVICE == "cuda" else 1e-4
SMALL = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def small_model(family="llama", seed=0):
    torch.manual_seed(seed)
    config_class, model_class = FAMILIES[family]
    extra = dict(head_dim=16) if family == "qwen3" else {}
    return model_class(config_class(**SMALL, **extra)).to(DEVICE).float().eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_convert_keeps_the_family_attention_and_adds_the_index_branch(family):
    model = small_model(family)
    ids = torch.randint(0, 64, (2, 96), device=DEVICE)
    dense = model(ids).logits
    # every block selected: MSA equals the family's dense attention
    hf.convert(model, block_size=16, topk=6, layers=[1])
    assert model.config._attn_implementation == "msa" and len(hf.msa_layers(model)) == 1
    all_blocks_error = (model(ids).logits - dense).abs().max()
    assert all_blocks_error < TOL
    for branch in hf.msa_layers(model):
        branch.topk = 2
    assert (model(ids).logits - dense).abs().max() > 10 * all_blocks_error  # now sparse: 2 of 6 blocks


def test_kl_loss_trains_only_the_index_branch_and_lm_loss_never_does():
    model = hf.convert(small_model(), block_size=16, topk=2).train()
    ids = torch.randint(0, 64, (1, 80), device=DEVICE)
    out = model(ids, labels=ids)
    kl = hf.kl_loss(model)
    assert kl is not None and hf.kl_loss(model) is None  # read once
    index_ids = {id(p) for p in hf.index_parameters(model)}
    kl_grads = torch.autograd.grad(kl, list(model.parameters()), allow_unused=True)
    for p, grad in zip(model.parameters(), kl_grads):
        assert (grad is not None and grad.abs().sum() > 0) == (id(p) in index_ids)
    lm_grads = torch.autograd.grad(out.loss, hf.index_parameters(model), allow_unused=True)
    assert all(g is None for g in lm_grads)


@pytest.mark.parametrize("index_dtype", [None, torch.float8_e4m3fn])
def test_generate_with_the_kv_cache_matches_a_full_recompute(index_dtype):
    """Also with FP8 index ranking: generation ranks on the same rounded vectors as the full pass."""
    model = hf.convert(small_model(), block_size=16, topk=2, index_dtype=index_dtype)
    ids = torch.randint(0, 64, (1, 70), device=DEVICE)
    full = model(ids).logits
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        prefill = model(ids[:, :45], past_key_values=cache, use_cache=True).logits
        steps = [model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1] for t in range(45, 70)]
    assert torch.allclose(prefill, full[:, :45], atol=TOL)
    assert torch.allclose(torch.stack(steps), full[0, 45:], atol=TOL)
    generated = model.generate(ids[:, :50], max_new_tokens=8, do_sample=False)
    assert torch.equal(model(generated).logits[0, 49:-1].argmax(-1), generated[0, 50:])


def test_save_pretrained_round_trip(tmp_path):
    model = hf.convert(small_model(), block_size=16, topk=2, layers=[0], init_from_attention=False, kl_topk=3,
                       index_dtype=torch.float8_e4m3fn)
    ids = torch.randint(0, 64, (1, 60), device=DEVICE)
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tmp_path).to(DEVICE).eval()
    assert loaded.config.msa["layers"] == [0] and [b.kl_topk for b in hf.msa_layers(loaded)] == [3]
    assert [b.index_dtype for b in hf.msa_layers(loaded)] == [torch.float8_e4m3fn]
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="no MSA model"):
        small_model().save_pretrained(tmp_path / "dense") or hf.from_pretrained(tmp_path / "dense")


def test_index_branch_starts_from_the_attention_it_imitates():
    model = small_model()
    attention = model.model.layers[0].self_attn
    hf.convert(model, block_size=16, topk=2)
    branch = attention.msa_index
    q_rows = attention.q_proj.weight.view(2, 2, 16, 64)
    assert torch.allclose(branch.index_q_proj.weight.view(2, 16, 64), q_rows.mean(1))
    assert torch.allclose(branch.index_k_proj.weight, attention.k_proj.weight.view(2, 16, 64).mean(0))


def test_bad_input_gets_clear_errors():
    model = hf.convert(small_model(), block_size=16, topk=2)
    with pytest.raises(ValueError, match="already MSA"):
        hf.convert(model)
    with pytest.raises(ValueError, match="unpadded"):
        model(torch.randint(0, 64, (2, 20), device=DEVICE),
              attention_mask=torch.tensor([[1] * 20, [0] * 5 + [1] * 15], device=DEVICE))
    with pytest.raises(ValueError, match="layers must be in"):
        hf.convert(small_model(), layers=[5])
    with pytest.raises(ValueError, match="kl_topk must be"):
        hf.convert(small_model(), topk=4, kl_topk=2)
    with pytest.raises(ValueError, match="index_dtype must be None"):
        hf.convert(small_model(), index_dtype=torch.float16)
    with pytest.raises(TypeError, match="decoder layers"):
        hf.convert(torch.nn.Linear(2, 2))
