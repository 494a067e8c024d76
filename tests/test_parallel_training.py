"""``msa train`` under torchrun (data x context parallel, FSDP2) equals one process: gloo, float64.

Each case launches ``torchrun -m msa train --cp C`` on N processes (N / C
data-parallel ranks, each sequence over C context-parallel ranks) and
compares what rank 0 wrote with a one-process run of the same command (the
global batch of ``--batch-size`` sequences in one process): the loss curve
(``--eval-every 1``: the training LM and KL losses and the validation loss of
every update, through the indexer warm-up and the sparse phase), the final
model and the checkpoint's optimizer state, within 1e-10 (float64: the runs
differ only in the order of their sums).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from msa.cli import main
from msa.training import load_model
from msa.training.parallel import check_layout

TESTS = Path(__file__).parent
TOLERANCE = 1e-10
# a tiny MSATransformer: blocks of 8 tokens, 64-token sequences (multiples of 2 x cp for cp <= 32)
ARGS = ["train", "--steps", "3", "--warmup-steps", "2", "--eval-every", "1", "--seq-len", "64", "--batch-size", "2",
        "--hidden", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2", "--block-size", "8", "--topk", "2",
        "--eval-batches", "1", "--dtype", "float64"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text file of random words (not msa's source, the default corpus, which may change between runs)."""
    from test_training import WORDS

    generator = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(" ".join(WORDS[i] for i in torch.randint(len(WORDS), (3000,), generator=generator)))
    return path


def torchrun(n_ranks: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent / "src"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n_ranks}", "-m",
               "msa", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, corpus):
    """The one-process run of ARGS, the reference."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert main([*ARGS, "--data", str(corpus), "--out", str(out)]) == 0
    return out


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def assert_same_run(out: Path, reference: Path) -> None:
    """The loss curves, final models and checkpointed optimizer states of two runs agree within TOLERANCE."""
    log, expected = records(out), records(reference)
    assert [(r["step"], r["phase"]) for r in log] == [(r["step"], r["phase"]) for r in expected]
    assert len(log) == 5 and {r["phase"] for r in log} == {"warmup", "sparse"}
    for record, want in zip(log, expected):
        for key in ("train_lm", "train_kl", "val_loss"):
            assert abs(record[key] - want[key]) <= TOLERANCE * abs(want[key]), (record["step"], key, record, want)
    model, want = (load_file(path / "model" / "model.safetensors") for path in (out, reference))
    assert model.keys() == want.keys()
    errors = {name: rel_err(model[name], want[name]) for name in want}
    assert max(errors.values()) < TOLERANCE, errors
    state, want_state = (torch.load(path / "checkpoint" / "optimizer.pt", weights_only=True)
                         for path in (out, reference))
    assert state["step"] == want_state["step"] and state["log_records"] == want_state["log_records"]
    assert [group["params"] for group in state["optimizer"]["param_groups"]] == [
        group["params"] for group in want_state["optimizer"]["param_groups"]]
    for number, moments in want_state["optimizer"]["state"].items():
        for name, value in moments.items():
            assert rel_err(state["optimizer"]["state"][number][name], value) < TOLERANCE, (number, name)


@pytest.mark.parametrize(("n_ranks", "cp"), [(2, 2), pytest.param(2, 1, marks=pytest.mark.slow),
                                              pytest.param(4, 2, marks=pytest.mark.slow)])
def test_torchrun_training_equals_one_process(n_ranks, cp, corpus, one_process, tmp_path):
    out = tmp_path / "run"
    result = torchrun(n_ranks, *ARGS, "--data", str(corpus), "--out", str(out), "--cp", str(cp))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("model saved to") == 1  # rank 0 alone reports (and writes)
    assert_same_run(out, one_process)
    model, tokenizer = load_model(out / "model")
    assert tokenizer is not None and model.config.hidden_size == 32
    assert all(layer.attention.context_parallel_group is None for layer in model.layers)  # a plain model again


@pytest.mark.slow
def test_a_torchrun_run_resumes_in_one_process_and_the_other_way(corpus, one_process, tmp_path):
    """A checkpoint written by rank 0 of a data x context parallel run resumes in one process, and one written
    by one process resumes under torchrun: both runs end where the uninterrupted one did."""
    args = [*ARGS, "--data", str(corpus)]
    parallel_first, one_first = tmp_path / "parallel_first", tmp_path / "one_first"
    result = torchrun(4, *args, "--out", str(parallel_first), "--cp", "2", "--max-seconds", "1e-9")
    assert result.returncode == 0 and "stopped after 1 of 5 updates" in result.stdout, result.stderr[-4000:]
    assert main([*args, "--out", str(parallel_first), "--resume"]) == 0
    assert_same_run(parallel_first, one_process)

    assert main([*args, "--out", str(one_first), "--max-seconds", "1e-9"]) == 0
    result = torchrun(2, *args, "--out", str(one_first), "--cp", "2", "--resume")
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_run(one_first, one_process)


@pytest.mark.parametrize(("cp", "world_size", "launched", "batch_size", "seq_len", "message"), [
    (0, 1, False, 2, 64, "--cp must be >= 1, got 0"),
    (2, 1, False, 2, 64, "--cp 2 splits each sequence over 2 processes: launch with torchrun"),
    (2, 3, True, 2, 64, "--cp 2 must divide the number of processes (3"),
    (1, 4, True, 2, 64, "--batch-size 2 (the global batch) must be a multiple of the 4 data-parallel ranks"),
    (4, 4, True, 2, 36, "--seq-len 36 must be a multiple of 2 x --cp = 8"),
])
def test_bad_layouts_raise_value_errors(cp, world_size, launched, batch_size, seq_len, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        check_layout(cp, world_size, launched, batch_size, seq_len)
    check_layout(1, world_size, launched, world_size, 64)  # one context-parallel rank, a batch row per process


@pytest.mark.parametrize(("environment", "options", "message"), [
    ({}, ["--cp", "2"], "--cp 2 splits each sequence over 2 processes: launch with torchrun --nproc-per-node N"),
    ({"WORLD_SIZE": "3"}, ["--cp", "2"], "--cp 2 must divide the number of processes (3"),
    ({"WORLD_SIZE": "2"}, ["--cp", "2", "--seq-len", "66"], "--seq-len 66 must be a multiple of 2 x --cp = 4"),
    ({}, ["--cp", "0"], "argument --cp: expected a positive integer, got '0'"),
])
def test_train_rejects_a_bad_cp_before_starting_processes(environment, options, message, tmp_path, capsys,
                                                          monkeypatch):
    if environment:
        for name, value in dict(RANK="0", LOCAL_RANK="0", **environment).items():
            monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path / "run"), *options])
    assert exit_info.value.code == 2
    printed = capsys.readouterr()
    assert "msa train: error: " in printed.err and message in printed.err, printed.err
    assert not (tmp_path / "run").exists()
