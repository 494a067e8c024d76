"""The ``msa`` command-line tool."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from msa.cli import main

# float32 on a GPU runs the kernels' dots in tf32
BOUND = 2e-3 if torch.cuda.is_available() else 1e-5


def test_bench_prints_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--seqlens", "64,128", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                 "--index-head-dim", "16", "--block-size", "16", "--topk", "2", "--repeats", "1", "--dtype", "float32",
                 "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "MSA vs dense causal attention" in printed and "speed-up" in printed
    record = json.loads(path.read_text())
    assert [row["seqlen"] for row in record["rows"]] == [64, 128]
    for row in record["rows"]:
        assert row["rel_err"] < BOUND and row["selection_match"] > 0.9
        assert 0 < row["attended_fraction"] <= 1 and row["dense_ms"] > 0 and row["msa_ms"] > 0
    # block 16 x topk 2 of 128 keys: the 64 queries past position 63 see at most 32 of their i + 1 keys
    assert record["rows"][1]["attended_fraction"] < 0.7


def test_bench_rejects_unknown_dtype():
    with pytest.raises(SystemExit):
        main(["bench", "--dtype", "int8"])


# ---- msa bench: argument validation

BAD_BENCH_ARGUMENTS = [
    (["--seqlens", "0"], "argument --seqlens: expected comma-separated positive integers, got '0'"),
    (["--seqlens", "abc"], "argument --seqlens: expected comma-separated positive integers, got 'abc'"),
    (["--seqlens", "64,"], "argument --seqlens"),
    (["--batch", "-1"], "argument --batch: expected a positive integer, got '-1'"),
    (["--heads", "0"], "argument --heads: expected a positive integer"),
    (["--kv-heads", "0"], "argument --kv-heads: expected a positive integer"),
    (["--heads", "3", "--kv-heads", "2"], "--heads (3) must be a multiple of --kv-heads (2)"),
    (["--head-dim", "0"], "argument --head-dim: expected a positive integer"),
    (["--index-head-dim", "-16"], "argument --index-head-dim: expected a positive integer"),
    (["--block-size", "0"], "argument --block-size: expected a power of two, got '0'"),
    (["--block-size", "48"], "argument --block-size: expected a power of two, got '48'"),
    (["--topk", "0"], "argument --topk: expected a positive integer"),
    (["--repeats", "0"], "argument --repeats: expected a positive integer, got '0'"),
    (["--check-max-seqlen", "-1"], "argument --check-max-seqlen: expected a non-negative integer"),
    (["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["--device", "cuda:99"], "argument --device: got 'cuda:99', but"),
    pytest.param(["--device", "cuda"], "argument --device: got 'cuda', but CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")),
    (["--json", "."], "--json must name a file, got the directory '.'"),
]


@pytest.mark.parametrize(("options", "message"), BAD_BENCH_ARGUMENTS)
def test_bench_rejects_bad_arguments_before_running(capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *options])
    assert exit_info.value.code == 2
    printed = capsys.readouterr()
    assert "msa bench: error: " in printed.err and message in printed.err
    assert printed.out == ""  # nothing ran


@pytest.mark.slow
@pytest.mark.parametrize("options", [[], ["--fp8-index"]])
def test_generate_matches_the_recompute(tmp_path, capsys, options):
    path = tmp_path / "generate.json"
    assert main(["generate", "--prompt-len", "300", "--new-tokens", "3", "--chunk-size", "128", "--dtype", "float32",
                 "--json", str(path), *options]) == 0
    record = json.loads(path.read_text())
    assert record["model"]["index_dtype"] == ("float8_e4m3fn" if options else None)
    assert record["logits_rel_err"] < 1e-4 and len(record["tokens"]) == 3
    assert "msa generate" in capsys.readouterr().out


# ---- msa train and msa generate

def train_args(out, *options):
    return ["train", "--steps", "4", "--warmup-steps", "2", "--eval-every", "2", "--seq-len", "64",
            "--batch-size", "2", "--eval-batches", "1", "--out", str(out), *options]


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def recorded_batches(monkeypatch):
    """Every batch the run draws: (stream, step, batch)."""
    from msa.training.data import TokenBatches

    calls = []
    draw = TokenBatches.__call__

    def recording(self, step):
        batch = draw(self, step)
        calls.append((self.stream, step, batch))
        return batch

    monkeypatch.setattr(TokenBatches, "__call__", recording)
    return calls


@pytest.fixture
def hf_checkpoint(tmp_path):
    """(a dense Llama checkpoint with its BPE tokenizer, a text corpus directory)."""
    pytest.importorskip("transformers")
    from test_training import tiny_llama_checkpoint, write_text_corpus

    from msa.training.data import corpus_texts

    text = write_text_corpus(tmp_path / "text")
    return tiny_llama_checkpoint(tmp_path / "dense", corpus_texts(text)), text


@pytest.mark.parametrize("options", [[], pytest.param(["--fp8-index"], marks=pytest.mark.slow)])
def test_train_runs_the_recipe_and_generate_loads_the_model(tmp_path, capsys, options):
    out = tmp_path / "run"
    assert main(["train", "--steps", "4", "--warmup-steps", "2", "--eval-every", "2", "--seq-len", "128",
                 "--batch-size", "2", "--hidden", "64", "--eval-batches", "1", "--out", str(out), *options]) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["index_dtype"] == ("float8_e4m3fn" if options else None)
    log = read_log(out)
    assert [(r["step"], r["lm_steps"], r["phase"]) for r in log] == [(2, 0, "warmup"), (4, 2, "sparse"),
                                                                    (6, 4, "sparse")]
    assert all(r["val_loss"] > 0 for r in log)
    for directory in (out / "model", out / "checkpoint"):
        assert {"model.safetensors", "config.json", "msa_tokenizer.json"} <= {p.name for p in directory.iterdir()}
    assert (out / "checkpoint" / "optimizer.pt").exists()
    capsys.readouterr()
    path = tmp_path / "generate.json"
    assert main(["generate", "--model", str(out / "model"), "--prompt", "def run(args):", "--new-tokens", "4",
                 "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["prompt_len"] == len(b"def run(args):") and len(record["tokens"]) == 4
    assert record["logits_rel_err"] < 1e-4 and record["model"]["index_dtype"] == config["index_dtype"]
    assert record["text"] in capsys.readouterr().out


def test_the_default_corpus_is_the_package_python_source(tmp_path, monkeypatch):
    import msa
    import msa.cli.train

    tokenized = []
    tokenize = msa.cli.train.tokenize
    monkeypatch.setattr(msa.cli.train, "tokenize", lambda texts, tokenizer: tokenized.extend(texts) or
                        tokenize(texts, tokenizer))
    assert main(train_args(tmp_path / "run", "--steps", "1", "--warmup-steps", "0", "--hidden", "64")) == 0
    package = Path(msa.__file__).parent
    sources = sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    assert tokenized == [p.read_text() for p in sources]  # the .py files alone, in path order


@pytest.mark.slow
def test_train_converts_a_hugging_face_checkpoint_and_trains_it_on_its_tokenizer(
        hf_checkpoint, recorded_batches, tmp_path, capsys):
    from msa.integrations import hf
    from msa.training.data import corpus_texts
    from msa.training.tokens import load_tokenizer

    dense, text = hf_checkpoint
    out = tmp_path / "msa"
    assert main(train_args(out, "--init", str(dense), "--data", str(text), "--block-size", "16", "--topk", "2")) == 0
    tokenizer = load_tokenizer(dense)
    corpus = "<eos>".join(corpus_texts(text))
    train_batches = [batch for stream, _, batch in recorded_batches if stream == "train"]
    assert train_batches and all(int(batch.max()) >= 256 for batch in train_batches)  # BPE ids, not bytes
    assert all(tokenizer.decode(row) in corpus for batch in train_batches for row in batch)
    assert [r["phase"] for r in read_log(out)] == ["warmup", "sparse", "sparse"]
    saved, saved_tokenizer = hf.from_pretrained(out / "model"), load_tokenizer(out / "model")
    assert len(hf.msa_layers(saved)) == 2 and saved_tokenizer.vocab_size == tokenizer.vocab_size

    capsys.readouterr()
    path = tmp_path / "generate.json"
    assert main(["generate", "--model", str(out / "model"), "--prompt", "the quick brown", "--new-tokens", "4",
                 "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["greedy_first_difference"] is None and record["logits_rel_err"] < 1e-4
    assert record["prompt_len"] == len(tokenizer.encode(["the quick brown"])[0]) and len(record["tokens"]) == 4
    assert record["model"]["msa"]["block_size"] == 16 and record["text"] in capsys.readouterr().out


@pytest.mark.slow
def test_train_from_a_converted_checkpoint_keeps_its_index_branch(hf_checkpoint, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import msa.cli.train

    dense, text = hf_checkpoint
    first = tmp_path / "first"
    assert main(train_args(first, "--init", str(dense), "--data", str(text), "--steps", "1", "--block-size", "16",
                           "--topk", "2", "--index-lr", "0.05")) == 0
    trained = {name: tensor for name, tensor in load_file(first / "model" / "model.safetensors").items()
               if ".msa_index." in name}
    started_from = {}

    class RecordingTrainer(msa.cli.train.Trainer):
        def __init__(self, model, *args, **kwargs):
            started_from.update({name: p.detach().clone() for name, p in model.named_parameters()
                                 if ".msa_index." in name})
            super().__init__(model, *args, **kwargs)

    monkeypatch.setattr(msa.cli.train, "Trainer", RecordingTrainer)
    assert main(train_args(tmp_path / "second", "--init", str(first / "model"), "--data", str(text), "--steps", "1",
                           "--warmup-steps", "0")) == 0
    assert trained and started_from.keys() == trained.keys()
    assert all(torch.equal(started_from[name], trained[name]) for name in trained)


@pytest.mark.slow
def test_dense_and_msa_runs_see_the_same_lm_batches(hf_checkpoint, recorded_batches, tmp_path):
    dense, text = hf_checkpoint
    common = ["--init", str(dense), "--data", str(text)]
    assert main(train_args(tmp_path / "dense", *common, "--dense", "--warmup-steps", "0")) == 0
    dense_calls = list(recorded_batches)
    recorded_batches.clear()
    assert main(train_args(tmp_path / "msa", *common, "--block-size", "16", "--topk", "2")) == 0

    def lm_batches(calls):
        return [(step, batch) for stream, step, batch in calls if stream == "train"]

    assert [step for step, _ in lm_batches(recorded_batches)] == [0, 1, 2, 3]  # after the warm-up's own batches
    assert [step for stream, step, _ in recorded_batches if stream == "warmup"] == [0, 1]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(lm_batches(dense_calls), lm_batches(recorded_batches)))
    assert len(lm_batches(dense_calls)) == 4
    assert [r["lm_steps"] for r in read_log(tmp_path / "dense")] == [2, 4]


@pytest.mark.slow
def test_train_refuses_to_reuse_out_and_resumes_after_a_crash(tmp_path, capsys, monkeypatch):
    from msa.training.data import TokenBatches

    whole, out = tmp_path / "whole", tmp_path / "cut"
    assert main(train_args(whole, "--hidden", "64")) == 0
    assert main(train_args(out, "--hidden", "64", "--max-seconds", "1e-9")) == 0  # stops after update 1
    assert [r["step"] for r in read_log(out)] == [1] and not (out / "model").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(train_args(out, "--hidden", "64"))
    refusal = f"--out {out} exists with a run; pass --resume to continue it or choose another --out"
    assert refusal in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(train_args(out, "--hidden", "64", "--resume", "--lr", "0.001"))
    assert "--lr 0.0003 there, 0.001 now" in capsys.readouterr().err

    draw = TokenBatches.__call__

    def crash_at_lm_step_3(self, step):
        if self.stream == "train" and step == 3:
            raise KeyboardInterrupt
        return draw(self, step)

    monkeypatch.setattr(TokenBatches, "__call__", crash_at_lm_step_3)
    with pytest.raises(KeyboardInterrupt):  # records at updates 2 and 4 came after the last checkpoint
        main(train_args(out, "--hidden", "64", "--resume", "--checkpoint-every-s", "1000"))
    assert [r["step"] for r in read_log(out)] == [1, 2, 4]
    monkeypatch.setattr(TokenBatches, "__call__", draw)
    assert main(train_args(out, "--hidden", "64", "--resume")) == 0
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 4, 6]
    assert log[-1]["val_loss"] == pytest.approx(read_log(whole)[-1]["val_loss"], abs=1e-6)


def test_train_needs_a_tokenizer_for_a_checkpoint_without_one(hf_checkpoint, tmp_path, capsys):
    from test_training import tiny_llama_checkpoint

    dense, text = hf_checkpoint
    bare = tiny_llama_checkpoint(tmp_path / "bare", ["a b c"] * 10, tokenizer=False)
    with pytest.raises(SystemExit):
        main(train_args(tmp_path / "run", "--init", str(bare), "--data", str(text)))
    assert f"--init {bare} has no tokenizer beside it" in capsys.readouterr().err
    assert main(train_args(tmp_path / "run", "--init", str(bare), "--data", str(text), "--tokenizer",
                           str(dense / "tokenizer.json"), "--steps", "1", "--warmup-steps", "0")) == 0
    with pytest.raises(SystemExit):
        main(train_args(tmp_path / "needles", "--init", str(dense), "--data", str(text), "--needle-rate", "0.5"))
    assert "--needle-rate: needles are byte strings and need byte tokens" in capsys.readouterr().err


BAD_TRAIN_ARGUMENTS = [
    (["--steps", "0", "--warmup-steps", "0"], "--steps 0 trains nothing without --warmup-steps"),
    (["--steps", "-5"], "argument --steps: expected a non-negative integer, got '-5'"),
    (["--warmup-steps", "-1"], "argument --warmup-steps: expected a non-negative integer, got '-1'"),
    (["--seq-len", "0"], "argument --seq-len: expected a positive integer"),
    (["--batch-size", "0"], "argument --batch-size: expected a positive integer"),
    (["--topk", "0"], "argument --topk: expected a positive integer"),
    (["--block-size", "48"], "argument --block-size: expected a power of two, got '48'"),
    (["--heads", "6", "--kv-heads", "4"], "--heads (6) must be a multiple of --kv-heads (4)"),
    (["--hidden", "100"], "--hidden (100) must be --heads (4) times an even head size"),
    (["--topk", "4", "--kl-topk", "2"], "--kl-topk (2) must be >= --topk (4)"),
    (["--lr", "-1"], "argument --lr: expected a positive finite number, got '-1'"),
    (["--kl-weight", "-0.1"], "argument --kl-weight: expected a non-negative number, got '-0.1'"),
    (["--needle-rate", "1.5"], "argument --needle-rate: expected a number in [0, 1], got '1.5'"),
    (["--min-lr-ratio", "2"], "argument --min-lr-ratio: expected a number in [0, 1], got '2'"),
    (["--eval-every", "0"], "argument --eval-every: expected a positive integer"),
    (["--eval-batches", "0"], "argument --eval-batches: expected a positive integer"),
    (["--max-seconds", "0"], "argument --max-seconds: expected a positive finite number"),
    (["--seed", "-1"], "argument --seed: expected a non-negative integer, got '-1'"),
    (["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["--dense"], "--dense needs --arch llama or --init (an MSATransformer is always MSA)"),
    (["--dense", "--arch", "llama", "--topk", "2"], "--topk is an MSA setting; --dense trains without MSA"),
    (["--dense", "--arch", "llama", "--warmup-steps", "3"], "--warmup-steps is an MSA setting"),
    (["--data", "{tmp}/missing.txt"], "--data: {tmp}/missing.txt does not exist"),
    (["--data", "{tmp}/blob.bin"], "--data: {tmp}/blob.bin is not a UTF-8 text file"),
    (["--data", "{tmp}"], "--data: {tmp} holds no text files"),
    (["--init", "{tmp}/blob.bin"], "--init: expected a model directory or a .gguf file, got {tmp}/blob.bin"),
    (["--init", "{tmp}", "--hidden", "64"], "--hidden sets up a new model; --init loads one"),
    (["--init", "{tmp}"], "--init: {tmp} holds no model (no config.json)"),
    (["--tokenizer", "{tmp}"], "--tokenizer: tokenizer {tmp}: not a tokenizer.json file nor a directory"),
    (["--seq-len", "100000"], "the default corpus (its last 5%) has"),
]


@pytest.mark.parametrize(("options", "message"), BAD_TRAIN_ARGUMENTS)
def test_train_rejects_bad_arguments_before_training(tmp_path, capsys, options, message):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))
    options = [option.replace("{tmp}", str(tmp_path)) for option in options]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path / "run"), *options])
    assert exit_info.value.code == 2
    printed = capsys.readouterr()
    assert "msa train: error: " in printed.err and message.replace("{tmp}", str(tmp_path)) in printed.err
    assert not (tmp_path / "run").exists()  # nothing ran


@pytest.mark.parametrize("package", ["gguf", "accelerate"])
def test_train_from_gguf_needs_the_gguf_and_accelerate_packages(tmp_path, capsys, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # not installed
    (tmp_path / "model.gguf").write_bytes(b"GGUF\0")
    with pytest.raises(SystemExit):
        main(["train", "--init", str(tmp_path / "model.gguf"), "--out", str(tmp_path / "run")])
    assert f"needs the {package} package (pip install {package})" in capsys.readouterr().err


def write_tiny_llama_gguf(path, tokenizer_json):
    """A float32 Llama GGUF (vocabulary 320, hidden 64, 2 layers, 4 heads, 2 KV heads) with the byte-level BPE
    tokenizer of ``tokenizer_json``."""
    import gguf

    bpe = json.loads(tokenizer_json.read_text())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(16)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(tokens) - 1))
    writer.add_token_merges([" ".join(merge) for merge in bpe["merges"]])
    writer.add_eos_token_id(0)
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (320, 64), "output_norm": (64,), "output": (320, 64)}
    for i in range(2):
        shapes.update({f"blk.{i}.attn_norm": (64,), f"blk.{i}.attn_q": (64, 64), f"blk.{i}.attn_k": (32, 64),
                       f"blk.{i}.attn_v": (32, 64), f"blk.{i}.attn_output": (64, 64), f"blk.{i}.ffn_norm": (64,),
                       f"blk.{i}.ffn_gate": (128, 64), f"blk.{i}.ffn_up": (128, 64), f"blk.{i}.ffn_down": (64, 128)})
    for name, shape in shapes.items():
        weight = np.ones(shape) if len(shape) == 1 else 0.02 * rng.standard_normal(shape)
        writer.add_tensor(f"{name}.weight", weight.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.slow
def test_train_from_gguf_takes_model_and_tokenizer_from_the_file(hf_checkpoint, recorded_batches, tmp_path):
    pytest.importorskip("gguf")
    from msa.integrations import hf
    from msa.training.tokens import load_tokenizer

    dense, text = hf_checkpoint
    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf", dense / "tokenizer.json")
    out = tmp_path / "run"
    assert main(train_args(out, "--init", str(gguf_file), "--data", str(text), "--steps", "2", "--warmup-steps", "1",
                           "--block-size", "16", "--topk", "2")) == 0
    ids = load_tokenizer(dense).encode(["the quick brown fox"])[0]
    assert load_tokenizer(out / "model").encode(["the quick brown fox"])[0].tolist() == ids.tolist()
    assert any(int(batch.max()) >= 256 for stream, _, batch in recorded_batches if stream == "train")
    assert len(hf.msa_layers(hf.from_pretrained(out / "model"))) == 2
    assert main(["generate", "--model", str(out / "model"), "--prompt", "the quick", "--new-tokens", "2"]) == 0


BAD_GENERATE_ARGUMENTS = [
    (["--prompt-len", "0"], "argument --prompt-len: expected a positive integer, got '0'"),
    (["--new-tokens", "0"], "argument --new-tokens: expected a positive integer, got '0'"),
    (["--new-tokens", "-3"], "argument --new-tokens: expected a positive integer, got '-3'"),
    (["--chunk-size", "0"], "argument --chunk-size: expected a positive integer, got '0'"),
    (["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["--prompt", "hello"], "--prompt needs --model (a model with a tokenizer)"),
    (["--prompt", "hello", "--prompt-file", "{tmp}/prompt.txt"], "not allowed with argument"),
    (["--model", "{tmp}"], "--model: {tmp} holds no model (no config.json)"),
    (["--model", "{tmp}", "--fp8-index"], "--fp8-index sets up the random model"),
    (["--model", "{tmp}", "--prompt", "hi", "--prompt-len", "5"], "--prompt-len sets a random prompt's length"),
    (["--model", "{tmp}", "--prompt-file", "{tmp}/missing.txt"], "--prompt-file: {tmp}/missing.txt is not a file"),
    (["--json", "{tmp}"], "--json must name a file"),
]


@pytest.mark.parametrize(("options", "message"), BAD_GENERATE_ARGUMENTS)
def test_generate_rejects_bad_arguments_before_running(tmp_path, capsys, options, message):
    (tmp_path / "prompt.txt").write_text("hello")
    options = [option.replace("{tmp}", str(tmp_path)) for option in options]
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *options])
    assert exit_info.value.code == 2
    printed = capsys.readouterr()
    assert "msa generate: error: " in printed.err and message.replace("{tmp}", str(tmp_path)) in printed.err
    assert printed.out == ""


def test_generate_refuses_a_prompt_for_a_model_without_a_tokenizer(hf_checkpoint, tmp_path, capsys):
    from test_training import tiny_llama_checkpoint

    bare = tiny_llama_checkpoint(tmp_path / "bare", ["a b c"] * 10, tokenizer=False)
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(bare), "--prompt", "hello"])
    assert f"--prompt: --model {bare} has no tokenizer beside it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(bare), "--chunk-size", "64"])
    assert "--chunk-size sets up msa.inference.Generator" in capsys.readouterr().err
    assert main(["generate", "--model", str(bare), "--prompt-len", "20", "--new-tokens", "3"]) == 0  # dense HF


@pytest.mark.slow
def test_a_warm_up_only_run_saves_the_converted_model_for_a_continuation(tmp_path):
    """--steps 0: the indexer warm-up alone (the training-free conversion); --init of its model continues it."""
    warmup = tmp_path / "warmup"
    assert main(train_args(warmup, "--steps", "0", "--warmup-steps", "3", "--eval-every", "3")) == 0
    assert [r["phase"] for r in read_log(warmup)] == ["warmup"]
    assert json.loads((warmup / "model" / "config.json").read_text())["mode"] == "sparse"  # the converted model
    continued = tmp_path / "continued"
    assert main(train_args(continued, "--init", str(warmup / "model"), "--warmup-steps", "0")) == 0
    assert [r["phase"] for r in read_log(continued)] == ["sparse", "sparse"]
