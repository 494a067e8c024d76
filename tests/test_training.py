"""msa.training: the recipe's phases and detach rules, resume, and the byte data with needles."""

import json

import numpy as np
import pytest
import torch

from msa.nn import MSAConfig, MSATransformer
from msa.training import RecipeConfig, Trainer
from msa.training.data import ByteBatches, insert_needles

CONFIG = MSAConfig(vocab_size=256, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                   intermediate_size=64, index_head_dim=8, block_size=16, topk=2)


def corpus(n=20000, seed=0):
    return np.random.default_rng(seed).integers(97, 123, n).astype(np.uint8)


def trainer(tmp_path, steps, warmup_steps, name="run", init_seed=0):
    torch.manual_seed(init_seed)
    model = MSATransformer(MSAConfig(**CONFIG.to_dict()))
    batches = ByteBatches(corpus(), batch_size=2, seq_len=64, seed=0)
    recipe = RecipeConfig(steps=steps, warmup_steps=warmup_steps, eval_every=2, lr_warmup_steps=1, bf16=False)
    return Trainer(model, recipe, batches, [batches(10**6)], tmp_path / name)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_warmup_trains_only_the_index_branch_then_everything_trains(tmp_path):
    run = trainer(tmp_path, steps=6, warmup_steps=3)
    before = snapshot(run.model)
    run.config.steps = 3
    run.run()
    after_warmup = snapshot(run.model)
    assert run.model.layers[0].attention.mode == "dense"
    for name in before:
        assert torch.equal(before[name], after_warmup[name]) != (".index_" in name), name
    run.config.steps = 6
    run.run()
    assert run.model.layers[0].attention.mode == "sparse"
    assert all(not torch.equal(after_warmup[n], p) for n, p in run.model.named_parameters())
    phases = [record["phase"] for record in run.log]
    assert phases[0] == "warmup" and phases[-1] == "sparse"
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [r["step"] for r in run.log] and all(r["train_kl"] > 0 for r in logged)


def test_a_run_cut_off_resumes_and_ends_where_an_uninterrupted_one_does(tmp_path):
    whole = trainer(tmp_path, steps=6, warmup_steps=2, name="whole")
    whole.run()
    cut = trainer(tmp_path, steps=6, warmup_steps=2, name="cut")
    cut.config.checkpoint_every_s = 0.0  # a checkpoint after every step
    batches = cut.train_batches

    def crash_at_step_4(step):
        if step == 4:
            raise KeyboardInterrupt
        return batches(step)

    cut.train_batches = crash_at_step_4
    with pytest.raises(KeyboardInterrupt):
        cut.run()
    resumed = trainer(tmp_path, steps=6, warmup_steps=2, name="cut", init_seed=1)  # other init: the checkpoint wins
    assert resumed.step == 4
    resumed.run()
    for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_warmup_needs_an_msa_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(ValueError, match="warmup_steps"):
        Trainer(dense, RecipeConfig(warmup_steps=1), lambda step: None, [], tmp_path)
    with pytest.raises(TypeError, match="decoder layers"):
        Trainer(torch.nn.Linear(2, 2), RecipeConfig(), lambda step: None, [], tmp_path)


def test_batches_are_a_function_of_seed_and_step():
    batches = ByteBatches(corpus(), batch_size=3, seq_len=100, seed=4, needle_rate=0.5)
    assert torch.equal(batches(7), batches(7)) and not torch.equal(batches(7), batches(8))
    assert batches(7).shape == (3, 100) and batches(7).dtype == torch.int64


def test_needles_sit_where_they_say_and_the_query_asks_for_one():
    text = corpus(3000, seed=2)
    sequence, needle = insert_needles(text, [0.0, 0.5, 1.0], np.random.default_rng(0), query=1)
    assert len(sequence) == len(text)
    line = bytes(sequence[needle.needle_start:needle.needle_end])
    answer = bytes(sequence[needle.answer_start:needle.answer_start + needle.answer_len])
    assert line.startswith(b"\n/* key ") and line.endswith(answer + b" */\n") and answer.isdigit()
    name = line[8:12]
    assert bytes(sequence[:needle.answer_start]).endswith(b"/* key " + name + b" = ")
    assert abs(needle.needle_start - 0.5 * (len(text) - 3 * 24 - 20)) < 30  # depth 0.5 of the text
