"""msa.training: the recipe's phases and batch streams, resume, corpora and tokenizers, model directories, needles."""

import json
import random

import numpy as np
import pytest
import torch

from msa.nn import MSAConfig, MSATransformer
from msa.training import RecipeConfig, Trainer, load_model, save_model
from msa.training.data import TokenBatches, corpus_texts, insert_needles, load_corpus, tokenize
from msa.training.tokens import ByteTokenizer, load_saved_tokenizer, load_tokenizer

CONFIG = MSAConfig(vocab_size=256, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                   intermediate_size=64, index_head_dim=8, block_size=16, topk=2)
WORDS = "the quick brown fox jumps over a lazy dog while sparse attention reads key blocks of the index".split()


def corpus(n=20000, seed=0):
    return np.random.default_rng(seed).integers(97, 123, n).astype(np.uint8)


def write_text_corpus(directory, files=3, words=1200):
    """Text files of random words, plus what a corpus must skip: a binary file and a __pycache__ file."""
    rng = random.Random(0)
    (directory / "notes").mkdir(parents=True)
    for i in range(files):
        (directory / ("notes" if i == 0 else ".") / f"doc{i}.txt").write_text(
            " ".join(rng.choice(WORDS) for _ in range(words)))
    (directory / "__pycache__").mkdir()
    (directory / "__pycache__" / "doc.cpython-311.pyc").write_text("cached text that is no source")
    (directory / "weights.bin").write_bytes(bytes(range(256)) * 8)
    return directory


def tiny_llama_checkpoint(directory, texts, tokenizer=True):
    """A dense Llama (vocabulary 320, hidden 64, 2 layers, 4 heads, 2 KV heads) saved with ``save_pretrained``,
    with a byte-level BPE tokenizer (up to 320 tokens, ``<eos>`` = 0) trained on ``texts`` beside it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(directory)
    if tokenizer:
        PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained(directory)
    return directory


def trainer(tmp_path, steps, warmup_steps, name="run", init_seed=0, resume=False, warmup_batches=None):
    torch.manual_seed(init_seed)
    model = MSATransformer(MSAConfig(**CONFIG.to_dict()))
    batches = TokenBatches(corpus(), batch_size=2, seq_len=64, seed=0)
    warmup_batches = warmup_batches or TokenBatches(corpus(), batch_size=2, seq_len=64, seed=0, stream="warmup")
    recipe = RecipeConfig(steps=steps, warmup_steps=warmup_steps, eval_every=2, lr_warmup_steps=1, bf16=False)
    return Trainer(model, recipe, batches, [batches(10**6)], tmp_path / name, warmup_batches=warmup_batches,
                   resume=resume)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def logged(path):
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- the recipe

def test_warmup_trains_only_the_index_branch_then_everything_trains(tmp_path):
    run = trainer(tmp_path, steps=0, warmup_steps=3)  # the warm-up alone first
    before = snapshot(run.model)
    run.run()
    after_warmup = snapshot(run.model)
    assert run.step == 3 and run.model.layers[0].attention.mode == "sparse"  # a finished run: the MSA model
    for name in before:
        assert torch.equal(before[name], after_warmup[name]) != (".index_" in name), name
    run.config.steps = 3
    run.run()
    assert run.step == 6 and run.model.layers[0].attention.mode == "sparse"
    assert all(not torch.equal(after_warmup[n], p) for n, p in run.model.named_parameters())
    assert [(r["step"], r["lm_steps"], r["phase"]) for r in run.log] == [
        (2, 0, "warmup"), (3, 0, "warmup"), (5, 2, "sparse"), (6, 3, "sparse")]
    assert [r["step"] for r in logged(tmp_path / "run")] == [r["step"] for r in run.log]
    assert all(r["train_kl"] > 0 for r in run.log)


def test_lm_updates_see_the_same_batches_and_learning_rates_with_or_without_a_warmup(tmp_path):
    seen = {}

    def recording(run_name, batches):
        def batch(step):
            seen[run_name].append((batches.stream, step, runs[run_name].optimizer.param_groups[0]["lr"]))
            return batches(step)
        return batch

    runs = {}
    for name, warmup_steps in (("without", 0), ("with", 3)):
        seen[name] = []
        warmup = TokenBatches(corpus(), batch_size=2, seq_len=64, seed=0, stream="warmup")
        runs[name] = trainer(tmp_path, steps=4, warmup_steps=warmup_steps, name=name,
                             warmup_batches=recording(name, warmup))
        runs[name].train_batches = recording(name, runs[name].train_batches)
        runs[name].run()
    assert [call[:2] for call in seen["with"]] == [("warmup", 0), ("warmup", 1), ("warmup", 2), ("train", 0),
                                                   ("train", 1), ("train", 2), ("train", 3)]
    assert seen["with"][3:] == seen["without"]  # LM update i: batch i at the same learning rate
    assert len({call[2] for call in seen["without"]}) == 4  # (a schedule, not a constant)


def test_the_kl_loss_never_shrinks_an_lm_update(tmp_path):
    """Gradients are clipped per parameter group: however large the KL loss, the model weights take the same
    LM step (the KL gradient reaches only the Index Branch, and its norm clips only that group)."""
    weights = {}
    for kl_weight in (0.0, 1e6):
        run = trainer(tmp_path, steps=1, warmup_steps=0, name=f"kl{kl_weight}")
        run.config.kl_weight, run.config.grad_clip = kl_weight, 1e-3  # every group's norm is clipped
        run.run()
        weights[kl_weight] = {n: p for n, p in snapshot(run.model).items() if ".index_" not in n}
    assert all(torch.equal(weights[0.0][n], weights[1e6][n]) for n in weights[0.0])


@pytest.mark.slow
def test_a_run_cut_off_resumes_where_its_checkpoint_is_and_its_log_has_no_duplicates(tmp_path):
    whole = trainer(tmp_path, steps=6, warmup_steps=2, name="whole")
    whole.run()
    cut = trainer(tmp_path, steps=6, warmup_steps=2, name="cut")
    cut.config.max_seconds = 1e-9  # the first session stops (after a record and a checkpoint) at update 1
    cut.run()
    assert cut.step == 1 and (tmp_path / "cut" / "checkpoint" / "optimizer.pt").exists()
    second = trainer(tmp_path, steps=6, warmup_steps=2, name="cut", resume=True)
    second.config.checkpoint_every_s = 1e9  # no checkpoint before the crash
    batches = second.train_batches

    def crash_at_lm_step_3(step):
        if step == 3:
            raise KeyboardInterrupt
        return batches(step)

    second.train_batches = crash_at_lm_step_3
    with pytest.raises(KeyboardInterrupt):
        second.run()
    assert [r["step"] for r in logged(tmp_path / "cut")] == [1, 2, 4]  # records 2 and 4 came after the checkpoint
    resumed = trainer(tmp_path, steps=6, warmup_steps=2, name="cut", init_seed=1, resume=True)  # the checkpoint wins
    assert resumed.step == 1 and [r["step"] for r in resumed.log] == [1]
    assert [r["step"] for r in logged(tmp_path / "cut")] == [1]  # the log file is cut back too
    resumed.run()
    assert [r["step"] for r in logged(tmp_path / "cut")] == [1, 2, 4, 6, 8]
    for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    assert resumed.log[-1]["val_loss"] == pytest.approx(whole.log[-1]["val_loss"], abs=1e-6)


def test_a_run_is_resumed_only_when_asked(tmp_path):
    trainer(tmp_path, steps=2, warmup_steps=0).run()
    with pytest.raises(FileExistsError, match="resume"):
        trainer(tmp_path, steps=2, warmup_steps=0)
    assert trainer(tmp_path, steps=2, warmup_steps=0, resume=True).finished


def test_warmup_needs_an_msa_model_and_batches_of_its_own(tmp_path):
    transformers = pytest.importorskip("transformers")
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(ValueError, match="warmup_steps"):
        Trainer(dense, RecipeConfig(warmup_steps=1), lambda step: None, [], tmp_path, warmup_batches=lambda step: None)
    with pytest.raises(ValueError, match="warmup_batches"):
        Trainer(MSATransformer(CONFIG), RecipeConfig(warmup_steps=1), lambda step: None, [], tmp_path)
    with pytest.raises(TypeError, match="decoder layers"):
        Trainer(torch.nn.Linear(2, 2), RecipeConfig(), lambda step: None, [], tmp_path)


# ---------------------------------------------------------------------- data and tokens

def test_batches_are_a_function_of_seed_stream_and_step():
    batches = TokenBatches(corpus(), batch_size=3, seq_len=100, seed=4, needle_rate=0.5)
    assert torch.equal(batches(7), batches(7)) and not torch.equal(batches(7), batches(8))
    assert batches(7).shape == (3, 100) and batches(7).dtype == torch.int64
    warmup = TokenBatches(corpus(), batch_size=3, seq_len=100, seed=4, stream="warmup", needle_rate=0.5)
    assert not torch.equal(batches(7), warmup(7))
    with pytest.raises(ValueError, match="byte tokens"):
        TokenBatches(corpus().astype(np.int32), batch_size=1, seq_len=100, needle_rate=0.5)


def test_a_directory_corpus_is_its_text_files_in_path_order(tmp_path):
    write_text_corpus(tmp_path)
    texts = corpus_texts(tmp_path)
    expected = [(tmp_path / name).read_text() for name in ("doc1.txt", "doc2.txt", "notes/doc0.txt")]
    assert texts == expected  # no .bin, no __pycache__
    tokens = load_corpus(tmp_path, ByteTokenizer())
    assert tokens.dtype == np.uint8 and bytes(tokens) == "\n".join(expected).encode()
    assert corpus_texts(tmp_path / "doc1.txt") == expected[:1]
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        load_corpus(tmp_path / "weights.bin", ByteTokenizer())
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        load_corpus(tmp_path / "nothing", ByteTokenizer())


def test_npy_corpora_are_token_ids_below_the_vocabulary(tmp_path):
    np.save(tmp_path / "ids.npy", np.arange(300, dtype=np.int32) % 256)
    assert load_corpus(tmp_path / "ids.npy", ByteTokenizer()).tolist() == (np.arange(300) % 256).tolist()
    np.save(tmp_path / "big.npy", np.arange(300, dtype=np.int32))
    with pytest.raises(ValueError, match=r"must lie in \[0, 256\).*\[0, 299\]"):
        load_corpus(tmp_path / "big.npy", ByteTokenizer())
    np.save(tmp_path / "2d.npy", np.zeros((2, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="1-D array of integer token ids"):
        load_corpus(tmp_path / "2d.npy", ByteTokenizer())


def test_a_hugging_face_tokenizer_encodes_documents_separated_by_eos(tmp_path):
    pytest.importorskip("tokenizers")
    texts = corpus_texts(write_text_corpus(tmp_path / "text"))
    tiny_llama_checkpoint(tmp_path / "model", texts)
    tokenizer = load_tokenizer(tmp_path / "model")
    assert tokenizer.vocab_size == 320 and load_tokenizer(tmp_path / "model" / "tokenizer.json").vocab_size == 320
    tokens = tokenize(texts, tokenizer)
    assert tokens.max() >= 256 and len(tokens) < sum(map(len, texts)) / 2  # subwords, not bytes
    documents = np.split(tokens, np.flatnonzero(tokens == 0))
    assert [tokenizer.decode(d[d != 0]) for d in documents] == texts
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "text")


# ---------------------------------------------------------------------- model directories

def test_an_msa_transformer_directory_loads_back_with_its_byte_tokenizer(tmp_path):
    torch.manual_seed(0)
    model = MSATransformer(MSAConfig(**CONFIG.to_dict()))
    save_model(model, tmp_path / "model", ByteTokenizer())
    loaded, tokenizer = load_model(tmp_path / "model")
    assert isinstance(loaded, MSATransformer) and isinstance(tokenizer, ByteTokenizer)
    ids = torch.randint(0, 256, (1, 48))
    assert torch.equal(model(ids)[0], loaded(ids)[0])
    assert load_saved_tokenizer(tmp_path) is None


def test_a_converted_hugging_face_directory_loads_back_with_its_index_branch(tmp_path):
    pytest.importorskip("transformers")
    from msa.integrations import hf

    texts = corpus_texts(write_text_corpus(tmp_path / "text"))
    dense, tokenizer = load_model(tiny_llama_checkpoint(tmp_path / "dense", texts))
    assert not hf.msa_layers(dense) and tokenizer.vocab_size == 320
    hf.convert(dense, block_size=16, topk=2, init_from_attention=False)
    save_model(dense, tmp_path / "msa", tokenizer)
    loaded, tokenizer = load_model(tmp_path / "msa")
    assert len(hf.msa_layers(loaded)) == 2 and tokenizer.vocab_size == 320
    for p, q in zip(hf.index_parameters(dense), hf.index_parameters(loaded)):
        assert torch.equal(p, q)


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
