"""msa.integrations.hf: GQA decoders of the Hugging Face families made MSA in place."""

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import msa  # noqa: E402
from msa.integrations import hf  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 MSA kernels on a GPU multiply in tf32; the PyTorch path on a CPU is float32-exact
TOL = 3e-3 if DEVICE == "cuda" else 1e-4
SMALL = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
# the KV cache's keyword: ``past_key_values`` (deprecated from transformers 5.2x on), and ``cache`` where it exists
CACHE_ARGUMENTS = ["past_key_values"]
if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters:
    CACHE_ARGUMENTS.append("cache")
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def small_model(family="llama", seed=0):
    torch.manual_seed(seed)
    config_class, model_class = FAMILIES[family]
    extra = dict(head_dim=16) if family == "qwen3" else dict(sliding_window=None) if family == "mistral" else {}
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


def greedy_by_full_forwards(model, ids, new_tokens):
    """Greedy decoding by repeated full forwards (no cache): the definition generate() must reproduce."""
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # the old keyword, on purpose
@pytest.mark.parametrize("argument", CACHE_ARGUMENTS)
@pytest.mark.parametrize("cache_class", ["dynamic", "msa"])
@pytest.mark.parametrize("index_dtype", [None, pytest.param(torch.float8_e4m3fn, marks=pytest.mark.slow)])
def test_a_kv_cache_under_either_argument_matches_a_full_recompute(argument, cache_class, index_dtype):
    """Prefill, a chunk of 15 tokens after the prefix, then one token at a time; layer 0 stays dense (its queries
    after a prefix align bottom-right). Also with FP8 ranking: on the same rounded vectors as the full pass."""
    model = hf.convert(small_model(), block_size=16, topk=2, layers=[1], index_dtype=index_dtype)
    ids = torch.randint(0, 64, (2, 70), device=DEVICE)
    full = model(ids).logits
    cache = (transformers.DynamicCache(config=model.config) if cache_class == "dynamic"
             else hf.MSACache(model, batch_size=2, max_length=70))
    with torch.no_grad():
        logits = [model(ids[:, :45], **{argument: cache}, use_cache=True).logits,
                  model(ids[:, 45:60], **{argument: cache}, use_cache=True).logits]
        logits += [model(ids[:, t:t + 1], **{argument: cache}, use_cache=True).logits for t in range(60, 70)]
    assert torch.allclose(torch.cat(logits, dim=1), full, atol=TOL)


@pytest.mark.parametrize("layers", [None, pytest.param([1], marks=pytest.mark.slow)])
def test_generate_runs_on_the_msa_cache_and_equals_greedy_full_forwards(monkeypatch, layers):
    model = hf.convert(small_model(), block_size=16, topk=2, layers=layers)
    attended, paths = [], set()
    attend = hf.MSACache.attend
    monkeypatch.setattr(hf.MSACache, "attend", lambda self, *args: attended.append(args[2].shape[2]) or
                        paths.add(self.attention.uses_kernels()) or attend(self, *args))
    prompts = torch.randint(0, 64, (2, 50), device=DEVICE)
    generated = model.generate(prompts, max_new_tokens=12, do_sample=False)
    assert torch.equal(generated, greedy_by_full_forwards(model, prompts, 12))
    n_msa = len(hf.msa_layers(model))
    assert attended == [50] * n_msa + [1] * (11 * n_msa)  # the prefill, then one token per step, every MSA layer
    assert paths == {DEVICE == "cuda"}  # the paged kernels on a GPU


def test_sampling_on_the_msa_cache_equals_sampling_on_the_exact_path():
    model = hf.convert(small_model(), block_size=16, topk=2)
    prompts = torch.randint(0, 64, (2, 40), device=DEVICE)
    sampled = {}
    for name in ("msa", "dynamic"):
        torch.manual_seed(1)
        cache = {} if name == "msa" else {CACHE_ARGUMENTS[-1]: transformers.DynamicCache(config=model.config)}
        sampled[name] = model.generate(prompts, max_new_tokens=10, do_sample=True, top_k=0, temperature=1.5,
                                       num_return_sequences=2, **cache)
    assert sampled["msa"].shape == (4, 50) and torch.equal(sampled["msa"], sampled["dynamic"])


def test_beam_search_runs_on_the_exact_path(monkeypatch):
    model = hf.convert(small_model(), block_size=16, topk=2)
    monkeypatch.setattr(hf.MSACache, "attend", None)  # would fail if called
    prompts = torch.randint(0, 64, (1, 40), device=DEVICE)
    assert model.generate(prompts, max_new_tokens=4, num_beams=2, do_sample=False).shape == (1, 44)


def test_save_pretrained_round_trip(tmp_path):
    model = hf.convert(small_model(), block_size=16, topk=2, layers=[0], init_from_attention=False, kl_topk=3,
                       index_dtype=torch.float8_e4m3fn)
    ids = torch.randint(0, 64, (1, 60), device=DEVICE)
    model.save_pretrained(tmp_path)
    assert hf.is_msa_checkpoint(tmp_path) and (tmp_path / "model.safetensors").exists()
    for loaded in (hf.from_pretrained(tmp_path), transformers.AutoModelForCausalLM.from_pretrained(tmp_path)):
        loaded = loaded.to(DEVICE).eval()
        assert type(loaded) is type(model) is hf.msa_classes("LlamaForCausalLM")[1]  # one class per family
        assert loaded.config.model_type == "msa_llama"
        assert loaded.config.msa["layers"] == [0] and [b.kl_topk for b in hf.msa_layers(loaded)] == [3]
        assert [b.index_dtype for b in hf.msa_layers(loaded)] == [torch.float8_e4m3fn]
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="no MSA model"):
        small_model().save_pretrained(tmp_path / "dense") or hf.from_pretrained(tmp_path / "dense")


def test_a_folder_saved_before_the_msa_model_types_still_loads(tmp_path):
    model = hf.convert(small_model(), block_size=16, topk=2)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"], config["architectures"] = "llama", ["LlamaForCausalLM"]
    del config["auto_map"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, 64, (1, 40), device=DEVICE)
    assert torch.equal(hf.from_pretrained(tmp_path).to(DEVICE).eval()(ids).logits, model(ids).logits)


LOAD_IN_A_FRESH_PROCESS = """
import sys, torch, transformers
try:
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=sys.argv[2] == "trust")
except ValueError as error:
    print("refused:", error)
else:
    index_weights = sorted(name for name, _ in model.named_parameters() if "msa_index" in name)
    print("loaded:", type(model).__name__, index_weights[0])
"""


@pytest.mark.slow
@pytest.mark.parametrize("trust", [True, False])
def test_auto_loading_without_importing_msa_needs_trust_remote_code(tmp_path, trust):
    """Without ``import msa.integrations.hf``, transformers never loads the folder as a dense model."""
    hf.convert(small_model(), block_size=16, topk=2).save_pretrained(tmp_path / "model")
    result = subprocess.run([sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, str(tmp_path / "model"),
                             "trust" if trust else "no"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr
    if trust:
        assert result.stdout.startswith("loaded: MSALlamaForCausalLM model.layers.0.self_attn.msa_index")
    else:
        assert result.stdout.startswith("refused:") and "trust_remote_code" in result.stdout


def test_index_branch_starts_from_the_attention_it_imitates():
    model = small_model()
    attention = model.model.layers[0].self_attn
    hf.convert(model, block_size=16, topk=2)
    branch = attention.msa_index
    q_rows = attention.q_proj.weight.view(2, 2, 16, 64)
    assert torch.allclose(branch.index_q_proj.weight.view(2, 16, 64), q_rows.mean(1))
    assert torch.allclose(branch.index_k_proj.weight, attention.k_proj.weight.view(2, 16, 64).mean(0))


def test_the_index_branch_is_msa_nn_and_its_weights_keep_their_names():
    """The converted layers' Index Branch is the module of msa.nn; checkpoints name its weights as they always did."""
    model = hf.convert(small_model(), block_size=16, topk=2, layers=[1])
    assert all(isinstance(branch, msa.nn.IndexBranch) for branch in hf.msa_layers(model))
    assert sorted(name for name in model.state_dict() if "msa_index" in name) == [
        "model.layers.1.self_attn.msa_index.index_k_proj.weight",
        "model.layers.1.self_attn.msa_index.index_q_proj.weight"]


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


@pytest.mark.parametrize("family, settings, message", [
    ("mistral", dict(sliding_window=4096), "sliding_window is 4096"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=32, max_window_layers=1), r"layers \[1\] use 'sliding"),
    ("llama", dict(attention_dropout=0.1), "attention_dropout is 0.1"),
])
def test_convert_refuses_what_msa_layers_cannot_honour(family, settings, message):
    model = small_model(family)
    for name, value in settings.items():
        setattr(model.config, name, value)
    if family == "qwen2":  # its layer types follow the window settings at construction
        model.config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match=message):
        hf.convert(model, block_size=16, topk=2)
    hf.convert(model, block_size=16, topk=2, layers=[0]) if family == "qwen2" else None


def test_a_selector_replaces_the_index_branch_selection():
    """With the Index Branch's own choice as the selector, nothing changes; with the local block alone, the
    attention reads only it."""
    model = hf.convert(small_model(), block_size=16, topk=2, layers=[1])
    branch = hf.msa_layers(model)[0]
    ids = torch.randint(0, 64, (1, 80), device=DEVICE)
    reference = model(ids).logits
    branch.selector = lambda q, k, index_q, index_k: msa.select_blocks(index_q, index_k, block_size=16, topk=2)
    assert torch.equal(model(ids).logits, reference)
    local = (torch.arange(80, device=DEVICE) // 16).int().view(1, 80, 1, 1).expand(1, 80, 2, 1)  # own block only
    branch.selector = lambda q, k, index_q, index_k: local
    branch.record_block_indices = True
    local_logits = model(ids).logits
    assert torch.equal(branch.block_indices, local) and not torch.allclose(local_logits, reference, atol=TOL)
    with pytest.raises(ValueError, match="whole sequences"):
        model.generate(ids[:, :40], max_new_tokens=2, do_sample=False)


BAD_HF_INPUTS = [
    ("padding attention_mask", lambda model, ids: model(ids, attention_mask=torch.ones_like(ids).index_fill_(
        1, torch.tensor([0], device=DEVICE), 0)), ValueError, "padding attention_mask"),
    ("packed position_ids", lambda model, ids: model(ids, position_ids=torch.cat(
        [torch.arange(10), torch.arange(10)]).to(DEVICE)[None]), ValueError, "position_ids must count up by one"),
    ("position_ids shape", lambda model, ids: model(ids, position_ids=torch.arange(19, device=DEVICE)[None]),
     ValueError, r"position_ids must have shape \[B, S\] = \[2, 20\]"),
    ("position_ids dtype", lambda model, ids: model(ids, position_ids=torch.zeros(2, 20, device=DEVICE)), TypeError,
     "position_ids must have dtype"),
    ("packed flash-attn arguments", lambda model, ids: model(ids, cu_seq_lens_q=torch.tensor(
        [0, 20], device=DEVICE), cu_seq_lens_k=torch.tensor([0, 20], device=DEVICE), max_length_q=20, max_length_k=20),
     ValueError, "got cu_seq_lens_q"),
    ("hidden_states dtype", lambda model, ids: model(inputs_embeds=torch.randn(2, 20, 64, device=DEVICE).double()),
     TypeError, "hidden_states must have dtype torch.float32"),
]


@pytest.mark.parametrize("call, error, message", [case[1:] for case in BAD_HF_INPUTS],
                         ids=[case[0] for case in BAD_HF_INPUTS])
def test_the_msa_attention_module_rejects_bad_input_naming_the_argument(call, error, message):
    model = hf.convert(small_model(), block_size=16, topk=2)
    with pytest.raises(error, match=message):
        call(model, torch.randint(0, 64, (2, 20), device=DEVICE))


def test_a_layers_deterministic_setting_reaches_the_ops(monkeypatch):
    from msa.nn import index_branch

    seen = []
    real = index_branch.sparse_attention
    monkeypatch.setattr(index_branch, "sparse_attention",
                        lambda *args, **kwargs: seen.append(kwargs["deterministic"]) or real(*args, **kwargs))
    model = hf.convert(small_model(), block_size=16, topk=2)
    ids = torch.randint(0, 64, (1, 40), device=DEVICE)
    model(ids)
    for branch in hf.msa_layers(model):
        branch.deterministic = True
    model(ids)
    assert seen == [None, None, True, True]
