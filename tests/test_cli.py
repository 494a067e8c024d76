"""The ``msa`` command-line tool."""

import json

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


@pytest.mark.parametrize("options", [[], ["--fp8-index"]])
def test_generate_matches_the_recompute(tmp_path, capsys, options):
    path = tmp_path / "generate.json"
    assert main(["generate", "--prompt-len", "300", "--new-tokens", "3", "--chunk-size", "128", "--dtype", "float32",
                 "--json", str(path), *options]) == 0
    record = json.loads(path.read_text())
    assert record["model"]["index_dtype"] == ("float8_e4m3fn" if options else None)
    assert record["logits_rel_err"] < 1e-4 and len(record["tokens"]) == 3
    assert "msa generate" in capsys.readouterr().out


@pytest.mark.parametrize("options", [[], ["--fp8-index"]])
def test_train_runs_the_recipe_and_saves_the_model(tmp_path, options):
    out = tmp_path / "run"
    assert main(["train", "--steps", "4", "--warmup-steps", "2", "--eval-every", "2", "--seq-len", "128",
                 "--batch-size", "2", "--out", str(out), *options]) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["index_dtype"] == ("float8_e4m3fn" if options else None)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["warmup", "sparse"] and all(r["val_loss"] > 0 for r in log)
    assert (out / "model" / "model.pt").exists() and (out / "checkpoint.pt").exists()
