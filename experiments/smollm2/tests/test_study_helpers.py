"""CPU tests of the study's evaluation helpers and RULER generator (seconds; no data files needed).

    .venv/bin/python -m pytest -q experiments/smollm2/tests
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

import evaluate as ev  # noqa: E402
import ruler  # noqa: E402

VOCAB = 160  # the toy byte tokenizer below: 0..127 characters + a few specials
SMALL_BUCKETS = ((0, 32), (32, 64), (64, 128), (128, 256))


# --------------------------------------------------------------------------- fixtures


def encode(texts: list[str]) -> list[list[int]]:
    """A toy tokenizer: one token per character (ASCII), '<|im_start|>'/'<|im_end|>' as one token."""
    out = []
    for text in texts:
        ids, i = [], 0
        while i < len(text):
            if text.startswith("<|im_start|>", i):
                ids.append(130)
                i += len("<|im_start|>")
            elif text.startswith("<|im_end|>", i):
                ids.append(131)
                i += len("<|im_end|>")
            else:
                ids.append(min(ord(text[i]), 127))
                i += 1
        out.append(ids)
    return out


def decode(ids) -> str:
    return "".join({130: "<|im_start|>", 131: "<|im_end|>"}.get(int(i), chr(int(i))) for i in ids)


ESSAYS = [
    "The first essay talks about startups. Founders work hard! Do they sleep? Nobody knows. " * 30,
    "A second essay, about painting and hackers. Hackers make things. Painters make things too. " * 30,
]


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    return model


def logits_fn_of(model):
    def fn(ids, keep=0):
        with torch.no_grad():
            return model(ids, logits_to_keep=keep).logits

    return fn


# --------------------------------------------------------------------------- held-out loss


def test_token_nll_matches_hf_loss(tiny_llama):
    window = np.random.default_rng(0).integers(0, VOCAB, size=256)
    nll = ev.token_nll(logits_fn_of(tiny_llama), window)
    assert nll.shape == (255,)
    ids = torch.as_tensor(window)[None]
    with torch.no_grad():
        loss = tiny_llama(ids, labels=ids).loss
    assert abs(nll.mean() - float(loss)) < 1e-5


def test_bucket_means_and_loss_by_bucket(tiny_llama):
    windows = np.random.default_rng(1).integers(0, VOCAB, size=(4, 256))
    nll = ev.window_nll(logits_fn_of(tiny_llama), windows)
    assert nll.shape == (4, 255)
    per = ev.bucket_means(nll, SMALL_BUCKETS)
    assert per.shape == (4, 4)
    np.testing.assert_allclose(per[:, 0], nll[:, :32].mean(1))
    np.testing.assert_allclose(per[:, 3], nll[:, 128:255].mean(1))  # 127 queries in the last bucket
    table = ev.loss_by_bucket(per, ["code", "code", "prose", "prose"], bucket_names=["a", "b", "c", "d"])
    assert set(table) == {"code", "prose", "all"}
    assert abs(table["all"]["a"] - per[:, 0].mean()) < 1e-12
    assert abs(table["code"]["d"] - per[:2, 3].mean()) < 1e-12
    with pytest.raises(ValueError):
        ev.bucket_means(nll[:, :20], SMALL_BUCKETS)


def test_default_buckets_at_8k():
    nll = np.arange(8191, dtype=np.float64)[None]
    per = ev.bucket_means(nll)
    assert per[0, 0] == np.mean(np.arange(512))
    assert per[0, 3] == np.mean(np.arange(4096, 8191))


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_gap_exact_cases():
    ref = np.random.default_rng(2).uniform(1.0, 2.0, size=32)
    same = ev.paired_bootstrap_gap(ref, ref, n_resamples=500)
    assert same["gap_pct"] == 0 and same["lo"] == 0 and same["hi"] == 0
    scaled = ev.paired_bootstrap_gap(ref, ref * 1.02, n_resamples=500)
    assert abs(scaled["gap_pct"] - 2.0) < 1e-9 and abs(scaled["lo"] - 2.0) < 1e-9 and abs(scaled["hi"] - 2.0) < 1e-9


def test_bootstrap_gap_seeds_and_interval():
    rng = np.random.default_rng(3)
    ref = rng.uniform(1.0, 2.0, size=(3, 64))
    new = ref * (1 + rng.normal([[0.005], [0.01], [0.02]], 0.01, size=(3, 64)))
    out = ev.paired_bootstrap_gap(ref, new, n_resamples=2000)
    per_seed = 100 * (new.mean(1) / ref.mean(1) - 1)
    np.testing.assert_allclose(out["per_seed"], per_seed)
    assert abs(out["gap_pct"] - per_seed.mean()) < 1e-9
    assert out["worst_seed"] == max(out["per_seed"])
    assert out["lo"] < out["gap_pct"] < out["hi"]
    assert out["seeds"] == 3 and out["n"] == 64
    again = ev.paired_bootstrap_gap(ref, new, n_resamples=2000)
    assert again == out  # fixed bootstrap seed: reproducible
    with pytest.raises(ValueError):
        ev.paired_bootstrap_gap(ref, new[:, :10])


def test_loss_gaps_layout():
    rng = np.random.default_rng(4)
    ref = rng.uniform(1, 2, size=(2, 8, 4))
    out = ev.loss_gaps(ref, ref * 1.01, ["code"] * 4 + ["prose"] * 4, n_resamples=200)
    assert set(out) == {"code", "prose", "all"}
    assert set(out["all"]) == set(ev.BUCKET_NAMES)
    assert abs(out["prose"]["[4096,8192)"]["gap_pct"] - 1.0) < 1e-9


def test_bootstrap_diff_points():
    ref = np.array([1, 1, 0, 1, 0, 1, 1, 1.0] * 10)
    new = ref.copy()
    new[:8] = 0  # 8 of 80 lost, of which 6 were correct: -7.5 points
    out = ev.paired_bootstrap_diff(ref, new, n_resamples=3000)
    assert abs(out["diff"] - (-7.5)) < 1e-9
    assert out["lo"] < -7.5 < out["hi"] <= 0
    assert abs(out["reference"] - 75.0) < 1e-9


# --------------------------------------------------------------------------- retrieval


def _fake_results(acc: dict, seed: int = 0, n: int = 20):
    rng = np.random.default_rng(seed)
    out, i = [], 0
    for task, p in acc.items():
        for length in (2048, 4096):
            for depth in (0.0, 1.0):
                for _ in range(n):
                    out.append({"id": i, "task": task, "length": length, "depth": depth,
                                "correct": bool(rng.uniform() < p)})
                    i += 1
    return out


def test_retrieval_accuracy_and_compare():
    ref = _fake_results({"passkey": 0.9, "multikey": 0.6})
    new = [dict(r) for r in ref]
    for r in new[:10]:  # passkey, length 2048, depth 0: ten answers wrong
        r["correct"] = False
    acc = ev.retrieval_accuracy(ref, by=("task",))
    assert set(acc) == {"passkey", "multikey"} and acc["passkey"]["n"] == 80
    cells = ev.retrieval_accuracy(ref, by=("task", "length", "depth"))
    assert "passkey/2048/0.0" in cells
    cmp = ev.retrieval_compare(ref, new, by=("task",), n_resamples=500)
    lost = sum(r["correct"] for r in ref[:10])
    assert abs(cmp["passkey"]["diff"] - (-100 * lost / 80)) < 1e-9
    assert cmp["multikey"]["diff"] == 0
    multi = ev.retrieval_compare([ref, ref], [new, ref], by=("task",), n_resamples=500)
    assert abs(multi["passkey"]["diff"] - (-50 * lost / 80)) < 1e-9
    assert multi["passkey"]["per_seed"][1] == 0
    with pytest.raises(ValueError):
        ev.retrieval_compare(ref, new[:-1])


# --------------------------------------------------------------------------- ruler


def _suite(**kw):
    args = dict(tasks=ruler.TASKS, lengths=(1024, 2048), depths=(0.0, 0.5, 1.0), n_per_cell=2, seed=5)
    args.update(kw)
    return ruler.build_suite(ESSAYS, encode, **args)


def test_ruler_lengths_spans_and_balance():
    content = ruler.content_table(lambda i: decode([i]), VOCAB)
    samples = _suite(content_tokens=content)
    assert len(samples) == 4 * 2 * 3 * 2
    cells = {}
    for s in samples:
        assert len(s.ids) == s.length
        assert decode(s.answer_ids) == s.answer
        assert s.content_mask.sum() == sum(ch.isalnum() for ch in s.answer)
        cells[(s.task, s.length, s.depth)] = cells.get((s.task, s.length, s.depth), 0) + 1
        text = decode(s.ids[: s.prompt_len])
        assert text.startswith("<|im_start|>system\n") and "<|im_end|>\n<|im_start|>assistant\n" in text[-300:]
        queried = [n for n in s.needles if n["role"] == "query"]
        assert queried
        for n in s.needles:
            a, b = n["span"]
            assert decode(s.ids[a:b]).strip() == n["text"]
            va, vb = n["value_span"]
            assert a <= va < vb <= b
            assert b <= s.prompt_len
        a_, b_ = s.needle_span()
        assert 0 <= a_ < b_ <= s.query_position
        if s.task != "vartrack":
            assert decode(s.ids[a_:b_]).strip() == s.answer.strip().split(",")[0]
        else:
            assert decode(s.ids[a_:b_]).strip().startswith(f"VAR {s.answer.split()[0]} =")
        if s.task in ("passkey", "multikey"):
            value = decode(s.ids[slice(*queried[0]["value_span"])]).strip()
            assert value == s.answer.strip()
        if s.task == "multivalue":
            values = [decode(s.ids[slice(*n["value_span"])]).strip() for n in queried]
            assert ", ".join(values) == s.answer.strip()  # in order of appearance
        if s.task == "vartrack":
            assert len(s.answer.split()) == 4
    assert set(cells.values()) == {2}


def test_ruler_depth_placement():
    samples = _suite(tasks=("passkey",), lengths=(2048,), depths=(0.0, 1.0), n_per_cell=3)
    for s in samples:
        a, b = s.needles[0]["span"]
        relative = a / s.prompt_len
        assert (relative < 0.15) if s.depth == 0.0 else (relative > 0.85)


def test_ruler_deterministic_and_roundtrip(tmp_path):
    a, b = _suite(), _suite()
    assert all(np.array_equal(x.ids, y.ids) and x.needles == y.needles for x, y in zip(a, b))
    c = _suite(seed=6)
    assert not all(np.array_equal(x.ids, y.ids) for x, y in zip(a, c))
    ruler.save_suite(a, tmp_path, info={"k": 1})
    loaded = ruler.load_suite(tmp_path)
    assert [s.meta() for s in loaded] == [s.meta() for s in a]
    assert all(np.array_equal(x.ids, y.ids) for x, y in zip(a, loaded))
    assert json.loads((tmp_path / "ruler_samples.json").read_text())["info"] == {"k": 1}


def test_ruler_plain_template():
    s = _suite(template="plain", tasks=("passkey",), lengths=(1024,), depths=(0.5,), n_per_cell=1)[0]
    assert "<|im_start|>" not in decode(s.ids)
    with pytest.raises(ValueError):
        _suite(template="other")


def test_ruler_score_oracle_and_model(tiny_llama):
    samples = _suite(lengths=(1024,), depths=(0.5,), n_per_cell=1,
                     content_tokens=ruler.content_table(lambda i: decode([i]), VOCAB))

    def oracle(ids):  # one-hot on the true next token: knows the answers
        full = next(s.ids for s in samples if len(s.ids) == ids.shape[1] + 1
                    and np.array_equal(s.ids[:-1], ids[0].numpy()))
        logits = torch.zeros(1, ids.shape[1], VOCAB)
        logits[0, torch.arange(ids.shape[1]), torch.as_tensor(full[1:])] = 10.0
        return logits

    results = ruler.score(oracle, samples)
    assert all(r["correct"] and r["strict"] for r in results)
    assert all(r["tokens_correct"] == r["answer_len"] for r in results)

    def wrong_format(ids, keep):  # right content, a wrong token at every format position
        logits = oracle(ids)[:, -keep:]
        sample = next(s for s in samples if len(s.ids) == ids.shape[1] + 1)
        for j, is_content in enumerate(sample.content_mask):
            if not is_content:
                logits[0, j] = 0
                logits[0, j, ord(":")] = 20.0
        return logits

    results = ruler.score(wrong_format, samples)
    assert all(r["correct"] for r in results)
    assert not all(r["strict"] for r in results)
    real = ruler.score(logits_fn_of(tiny_llama), samples)
    assert len(real) == len(samples) and all(set(r) >= {"correct", "answer_logprob"} for r in real)


# --------------------------------------------------------------------------- selectors and recall


def _qk(seqlen=96, heads=4, groups=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(seqlen, heads, dim, generator=g) * 2
    k = torch.randn(seqlen, groups, dim, generator=g) * 2
    return q, k


def _brute_recall(q, k, blocks, block_size):
    seqlen, heads, dim = q.shape
    groups = k.shape[1]
    out = torch.zeros(seqlen, groups)
    for i in range(seqlen):
        for g in range(groups):
            hs = range(g * heads // groups, (g + 1) * heads // groups)
            probs = torch.stack([torch.softmax((q[i, h] @ k[: i + 1, g].T) / math.sqrt(dim), -1) for h in hs]).mean(0)
            chosen = {int(b) for b in blocks[i, g] if b >= 0}
            out[i, g] = sum(float(probs[t]) for t in range(i + 1) if t // block_size in chosen)
    return out


def test_attention_recall_brute_force_and_full_cover():
    q, k = _qk()
    blocks = ev.random_blocks(96, 2, block_size=16, topk=2, generator=torch.Generator().manual_seed(1))
    recall = ev.attention_recall(q, k, blocks, block_size=16, chunk=7)
    torch.testing.assert_close(recall, _brute_recall(q, k, blocks, 16), atol=1e-5, rtol=0)
    every = ev.local_blocks(96, 2, block_size=16, topk=6)  # 6 x 16 = 96: every visible block
    torch.testing.assert_close(ev.attention_recall(q, k, every, block_size=16), torch.ones(96, 2), atol=1e-5, rtol=0)


def test_attention_recall_matches_msa_reference():
    reference = pytest.importorskip("msa.reference")
    q, k = _qk(seqlen=80)
    v = torch.randn_like(k)
    blocks = ev.random_blocks(80, 2, block_size=16, topk=2, generator=torch.Generator().manual_seed(2))
    _, lse_sparse = reference.sparse_attention(q[None], k[None], v[None], blocks[None], block_size=16, return_lse=True)
    _, lse_dense = reference.dense_attention(q[None], k[None], v[None], return_lse=True)
    per_head = torch.exp(lse_sparse - lse_dense)[0]  # [S, Hq]: the head's mass inside its selection
    expected = per_head.unflatten(1, (2, 2)).mean(-1)
    torch.testing.assert_close(ev.attention_recall(q, k, blocks, block_size=16), expected, atol=1e-5, rtol=0)


def test_selectors_format_and_oracle_is_best():
    q, k = _qk(seqlen=128)
    bs, topk = 16, 3
    local = ev.local_blocks(128, 2, block_size=bs, topk=topk)
    rand = ev.random_blocks(128, 2, block_size=bs, topk=topk, generator=torch.Generator().manual_seed(3))
    oracle = ev.oracle_blocks(q, k, block_size=bs, topk=topk, chunk=10)
    pos = torch.arange(128)
    for sel in (local, rand, oracle):
        assert sel.shape == (128, 2, topk) and sel.dtype == torch.int32
        assert torch.equal(sel[..., 0].long(), (pos // bs)[:, None].expand(-1, 2))  # local block first
        valid = sel >= 0
        assert bool(((sel <= (pos // bs)[:, None, None]) | ~valid).all())  # never a future block
        for i in (0, 20, 40, 127):
            for g in range(2):
                chosen = [int(b) for b in sel[i, g] if b >= 0]
                assert len(chosen) == len(set(chosen)) == min(topk, i // bs + 1)
    r_oracle = ev.attention_recall(q, k, oracle, block_size=bs)
    for sel in (local, rand):
        assert bool((r_oracle >= ev.attention_recall(q, k, sel, block_size=bs) - 1e-6).all())


def test_keys_read():
    bs, topk = 16, 3
    local = ev.local_blocks(100, 1, block_size=bs, topk=topk)
    keys = ev.keys_read(local, block_size=bs)[:, 0]
    pos = torch.arange(100)
    expected = torch.minimum(pos + 1, pos % bs + 1 + (topk - 1) * bs)
    assert torch.equal(keys, expected.float())
    every = ev.local_blocks(100, 1, block_size=bs, topk=7)
    assert torch.equal(ev.keys_read(every, block_size=bs)[:, 0], (pos + 1).float())


def test_summarize_recall():
    recall = torch.ones(2, 3, 256, 2)
    recall[:, 1, 64:] = 0.5
    out = ev.summarize_recall(recall, block_size=16, topk=4, position_edges=(0, 64, 128, 256))
    assert out["first_nontrivial_position"] == 64
    assert out["by_layer"]["median"] == [1.0, 0.5, 1.0]
    assert out["by_position"]["[0,64)"]["median"] == 1.0
    assert abs(out["mean"] - (2 / 3 + 0.5 / 3)) < 1e-6


def test_needle_hits_and_chance():
    bs, topk = 16, 4
    query = 16 * 20 + 5  # block 20: 21 visible blocks
    span = (16 * 7 + 10, 16 * 8 + 3)  # blocks 7 and 8
    sel = torch.tensor([[20, 7, 8, 1], [20, 7, 2, 3], [20, 1, 2, 3]])
    out = ev.needle_hits(sel, query, span, block_size=bs, topk=topk)
    assert out["needle_blocks"] == [7, 8]
    assert out["hits_all"] == [True, False, False] and out["hits_any"] == [True, True, False]
    # Monte Carlo of the chance rates with the random selector
    g = torch.Generator().manual_seed(0)
    draws = ev.random_blocks(query + 1, 4000, block_size=bs, topk=topk, generator=g)[query]  # [4000, topk]
    mc = ev.needle_hits(draws, query, span, block_size=bs, topk=topk)
    assert abs(mc["all"] - out["chance_all"]) < 0.02
    assert abs(mc["any"] - out["chance_any"]) < 0.03
    assert abs(out["chance_all"] - math.comb(18, 1) / math.comb(20, 3)) < 1e-12
    local = ev.needle_hits(sel, query, (query - 3, query - 1), block_size=bs, topk=topk)
    assert local["all"] == 1.0 and local["chance_all"] == 1.0
    with pytest.raises(ValueError):
        ev.needle_hits(sel, query, (query + 1, query + 5), block_size=bs, topk=topk)


# --------------------------------------------------------------------------- output


def test_run_dir_and_write_json(tmp_path):
    a = ev.run_dir(tmp_path, arm="dense", seed=0, date="2026-12-04")
    b = ev.run_dir(tmp_path, arm="dense", seed=0, date="2026-12-04")
    assert a.name == "2026-12-04_seed0_dense" and b.name == "2026-12-04_seed0_dense_2"
    path = ev.write_json(a / "results.json", {"x": np.float32(1.5), "t": torch.tensor([1, 2]), "nan": float("nan"),
                                               "arr": np.arange(3)})
    assert json.loads(path.read_text()) == {"x": 1.5, "t": [1, 2], "nan": None, "arr": [0, 1, 2]}
    with pytest.raises(FileExistsError):
        ev.write_json(path, {})
    ev.write_json(path, {"y": 1}, overwrite=True)
    assert json.loads(path.read_text()) == {"y": 1}
    assert [p.name for p in a.iterdir()] == ["results.json"]


# --------------------------------------------------------------------------- report


def synthetic_arms(gaps_pct: list[float], n_windows: int = 8) -> dict:
    """``{seed: {arm: record}}``: dense and msa64x8 whose [4K, 8K) losses differ by ``gaps_pct`` per seed, one
    retrieval task answered alike, and recall medians of 0.9."""
    buckets = ev.BUCKET_NAMES
    arms = {}
    for seed, gap in enumerate(gaps_pct):
        windows = np.full((n_windows, len(buckets)), 2.0)
        samples = [dict(id=i, task="passkey", length=2048, depth=0.0, correct=i % 4 != 0) for i in range(40)]
        record = dict(loss=dict(per_window_bucket=windows.tolist(), domains=["code"] * n_windows),
                      retrieval=dict(samples=samples))
        msa_windows = windows.copy()
        msa_windows[:, -1] *= 1 + gap / 100
        arms[seed] = dict(dense=record, msa64x8=dict(loss=dict(per_window_bucket=msa_windows.tolist(),
                                                               domains=["code"] * n_windows),
                                                     retrieval=dict(samples=samples),
                                                     diagnostics=dict(recall=dict(median=0.9))))
    return arms


def test_report_criteria_verdicts():
    import report

    def c1(lines):
        return next(line for line in lines if "C1 loss" in line)

    one_seed_fails = c1(report.criteria(synthetic_arms([2.0])))
    assert "+2.00%" in one_seed_fails and "**failed**" in one_seed_fails  # one seed over 1.5% fails C1 at once
    assert "pending (1 of 3 seeds)" in c1(report.criteria(synthetic_arms([0.5])))
    assert c1(report.criteria(synthetic_arms([0.5, 0.8, 1.2]))).endswith("passed.")
    assert "**failed**" in c1(report.criteria(synthetic_arms([1.2, 1.2, 1.2])))  # mean over 1.0%
    lines = report.criteria(synthetic_arms([0.5, 0.8, 1.2]))
    assert any("C2 retrieval" in line and line.endswith("passed.") for line in lines)  # equal answers: 0 points
    assert any("C4 recall" in line and "passed" in line for line in lines)
