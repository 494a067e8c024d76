"""Quality study: does MSA match dense GQA attention? One GPU, three stages, resumable.

    python experiments/quality/study.py pretrain --work /tmp/msa-quality --budget-s 470
    python experiments/quality/study.py continue --work /tmp/msa-quality --budget-s 500
    python experiments/quality/study.py evaluate --work /tmp/msa-quality --out results/
    python experiments/quality/study.py report --results experiments/quality/results   # plots + README table

1. ``pretrain``: a Llama-style GQA model (Hugging Face ``LlamaForCausalLM``,
   byte tokens, 8 layers, hidden 512, 8 query / 4 KV heads: 23.6M
   parameters) trained from scratch with dense attention on Linux kernel C
   code at 16K tokens; half of the sequences carry 1-3 key-value needles and
   end with a query (so that the model learns retrieval). The step count is
   set from a timed calibration so that the cosine schedule ends on time.
2. ``continue``: from that checkpoint, the same batches for every run:
   dense continuation, and MSA conversions (``msa.integrations.hf.convert``)
   with block 64 x topk 8 (3% of 16K keys) and the paper's 128 x 16 (KL loss
   on the top 32 blocks), and 128 x 16 with the KL loss on the selection
   (ablation), each an indexer warm-up (dense Main Branch, KL loss only) then
   sparse training (LM + KL loss).
3. ``evaluate``: held-out files only: validation loss at 4K..32K tokens,
   and multi-key retrieval (3 needles, the queried one at depths 0..100%,
   lengths 4K..32K; exact match of its 5 digits), plus how often the
   queried needle's block is among the blocks the MSA layers select.

Checkpoints stay under ``--work`` (the GPU machine's disk); each stage skips
what is done and resumes what was cut off. Only JSON and PNG go to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import lzma
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SEQ_LEN, BATCH = 16384, 2
MODEL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=32768, rope_theta=500000.0, attention_dropout=0.0)
# name: None (dense) or (block size, topk, kl_topk: the KL loss's support in blocks, None = the selection)
VARIANTS = {"dense": None, "msa_64x8": (64, 8, 32), "msa_128x16": (128, 16, 32),
            "msa_128x16_selection_kl": (128, 16, None)}
KL_WEIGHT = 1.0
EVAL_LENGTHS = [4096, 8192, 16384, 32768]
EVAL_TOKENS = 1 << 18  # validation tokens per length
DEPTHS = [i / 10 for i in range(11)]
SAMPLES = 16  # retrieval samples per (length, depth)
DRAFT_TOKENS = 8  # consecutive query tokens whose selections are pooled (an MTP decode step's tokens)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def corpus(work: Path, split: str) -> np.ndarray:
    """The split's bytes, unpacked once from data/<split>.bin.xz into the work directory."""
    path = work / "data" / f"{split}.bin"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(lzma.decompress((HERE / "data" / f"{split}.bin.xz").read_bytes()))
    return np.memmap(path, dtype=np.uint8, mode="r")


def eval_batches(work: Path, count: int = 4) -> list[torch.Tensor]:
    from msa.training.data import TokenBatches

    source = TokenBatches(corpus(work, "val"), batch_size=1, seq_len=SEQ_LEN, seed=7)
    return [source(i) for i in range(count)]


def step_seconds(model, batches, steps: int = 3) -> float:
    """Seconds per training step (LM + KL loss, AdamW) of a throw-away copy of ``model``."""
    from msa.training.recipe import ModelApi, lm_loss

    probe = copy.deepcopy(model).train()
    api = ModelApi(probe)
    optimizer = torch.optim.AdamW(probe.parameters())

    def step(index):
        batch = batches(index).to(DEVICE)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=DEVICE.type == "cuda"):
            logits, kl = api(batch)
        loss = lm_loss(logits, batch) + (kl if kl is not None else 0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(0)  # compiles the kernels
    _synchronize()
    start = time.monotonic()
    for index in range(steps):
        step(index + 1)
    _synchronize()
    return (time.monotonic() - start) / steps


def _synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def pretrain(args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from msa.training import RecipeConfig, Trainer
    from msa.training.data import TokenBatches
    from msa.training.tokens import ByteTokenizer

    work = args.work
    final = work / "base"
    if (final / "config.json").exists():
        print("pretrain: done already")
        return
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=ByteTokenizer.vocab_size, **MODEL)).to(DEVICE)
    model.set_attn_implementation("sdpa")
    batches = TokenBatches(corpus(work, "train"), batch_size=BATCH, seq_len=SEQ_LEN, seed=0, needle_rate=0.5)
    plan_path = work / "pretrain_plan.json"
    if plan_path.exists():
        steps = json.loads(plan_path.read_text())["steps"]
    else:
        seconds = step_seconds(model, batches)
        steps = int((args.budget_s - 60) / (seconds * 1.08))  # leave time for evaluations and checkpoints
        plan_path.write_text(json.dumps(dict(steps=steps, step_s=seconds, params=sum(p.numel() for p in model.parameters()))))
    recipe = RecipeConfig(steps=steps, lr=1.5e-3, lr_warmup_steps=min(100, steps // 10), eval_every=max(1, steps // 8),
                          checkpoint_every_s=60, max_seconds=args.budget_s - 20)
    trainer = Trainer(model, recipe, batches, eval_batches(work), work / "pretrain", resume=True,
                      name="pretrain (dense)")
    trainer.run()  # to the planned step, or to the time budget
    model.save_pretrained(final)
    _export(work, args.out)


def continue_runs(args) -> None:
    from transformers import AutoModelForCausalLM

    from msa.integrations import hf
    from msa.training import RecipeConfig, Trainer
    from msa.training.data import TokenBatches

    work = args.work
    batches = TokenBatches(corpus(work, "train"), batch_size=BATCH, seq_len=SEQ_LEN, seed=1000, needle_rate=0.5)
    warmup_batches = TokenBatches(corpus(work, "train"), batch_size=BATCH, seq_len=SEQ_LEN, seed=1000,
                                  stream="warmup", needle_rate=0.5)
    plan_path = work / "continue_plan.json"
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
    else:  # time one step of each run; the steps fill --plan-s (this command and the next one's continuation)
        step_s = {}
        for name, msa_shape in VARIANTS.items():
            probe = AutoModelForCausalLM.from_pretrained(work / "base").to(DEVICE)
            if msa_shape is not None:
                hf.convert(probe, block_size=msa_shape[0], topk=msa_shape[1], kl_topk=msa_shape[2])
            step_s[name] = step_seconds(probe, batches)
            del probe
        steps = max(1, int((args.plan_s - 30 * len(VARIANTS)) / (sum(step_s.values()) * 1.1)))
        plan = dict(steps=steps, warmup_steps=max(1, steps // 5), step_s=step_s)
        plan_path.write_text(json.dumps(plan))
    deadline = time.monotonic() + args.budget_s - 30
    for name, msa_shape in VARIANTS.items():
        out = work / "runs" / name
        if (out / "model" / "config.json").exists():
            continue
        if deadline - time.monotonic() < 20:
            break
        model = AutoModelForCausalLM.from_pretrained(work / "base").to(DEVICE)
        warmup = 0
        if msa_shape is not None:
            hf.convert(model, block_size=msa_shape[0], topk=msa_shape[1], kl_topk=msa_shape[2])
            warmup = plan["warmup_steps"]
        else:
            model.set_attn_implementation("sdpa")
        recipe = RecipeConfig(steps=plan["steps"], warmup_steps=warmup, kl_weight=KL_WEIGHT, lr=3e-4, index_lr=1e-3,
                              lr_warmup_steps=20, eval_every=max(1, plan["steps"] // 6), checkpoint_every_s=60,
                              max_seconds=max(10.0, deadline - time.monotonic()))
        trainer = Trainer(model, recipe, batches, eval_batches(work), out, warmup_batches=warmup_batches,
                          resume=True, name=name)
        trainer.run()
        if trainer.finished:
            model.save_pretrained(out / "model")
        del model, trainer
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    _export(work, args.out)


@torch.no_grad()
def evaluate(args) -> None:
    from msa.integrations import hf
    from msa.training.data import insert_needles
    from transformers import AutoModelForCausalLM

    work = args.work
    val = corpus(work, "val")
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    models = {"base (dense, before continuation)": work / "base",
              **{name: work / "runs" / name / "model" for name in VARIANTS}}
    for name, path in models.items():
        if name in results or not (path / "config.json").exists():
            continue
        is_msa = name.startswith("msa")
        model = (hf.from_pretrained(path) if is_msa else AutoModelForCausalLM.from_pretrained(path)).to(DEVICE).eval()
        if not is_msa:
            model.set_attn_implementation("sdpa")
        branches = hf.msa_layers(model)
        for branch in branches:
            branch.record_block_indices = True
        record = dict(loss={}, retrieval={}, retrieval_hits={}, needle_block_selected={}, draft_union_blocks=[])
        for length in EVAL_LENGTHS:
            rng = np.random.default_rng(length)
            losses = []
            for start in rng.integers(0, len(val) - length, max(1, EVAL_TOKENS // length)):
                ids = torch.from_numpy(np.asarray(val[start:start + length]).astype(np.int64))[None].to(DEVICE)
                with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=DEVICE.type == "cuda"):
                    logits = model(input_ids=ids).logits
                losses.append(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item())
                if length == SEQ_LEN:
                    record["draft_union_blocks"] += [draft_union_blocks(b.block_indices[0], b.topk * b.block_size)
                                                     for b in branches]
            record["loss"][str(length)] = float(np.mean(losses))
            for depth in DEPTHS:
                hits, selected = [], []
                for sample in range(SAMPLES):
                    rng = np.random.default_rng([length, int(depth * 100), sample])
                    start = int(rng.integers(0, len(val) - length))
                    others = list(rng.random(2))
                    text, needle = insert_needles(np.asarray(val[start:start + length]), [depth] + others, rng, query=0)
                    ids = torch.from_numpy(text.astype(np.int64))[None].to(DEVICE)
                    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=DEVICE.type == "cuda"):
                        logits = model(input_ids=ids).logits
                    answer = slice(needle.answer_start, needle.answer_start + needle.answer_len)
                    predicted = logits[0, answer.start - 1:answer.stop - 1].argmax(-1)
                    hits.append(bool((predicted == ids[0, answer]).all()))
                    if branches:  # the query token before the first digit: is the needle's value block selected?
                        value_start = needle.needle_end - 4 - needle.answer_len  # "... = DIGITS */\n"
                        per_layer = []
                        for branch in branches:
                            blocks = branch.block_indices[0, answer.start - 1].long()  # [G, topk]
                            value_blocks = torch.arange(value_start, value_start + needle.answer_len,
                                                        device=blocks.device) // branch.block_size
                            per_layer.append((blocks[..., None] == value_blocks).any(-1).any(-1).float().mean().item())
                        selected.append(float(np.mean(per_layer)))
                record["retrieval"][f"{length}/{depth:.1f}"] = float(np.mean(hits))
                record["retrieval_hits"][f"{length}/{depth:.1f}"] = hits
                if selected:
                    record["needle_block_selected"][f"{length}/{depth:.1f}"] = float(np.mean(selected))
        record["draft_union_blocks"] = float(np.mean(record["draft_union_blocks"])) if branches else None
        results[name] = record
        results_path.write_text(json.dumps(results, indent=2))
        print(name, json.dumps(record["loss"]), "retrieval", np.mean(list(record["retrieval"].values())))
        del model
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    _export(work, args.out)


def draft_union_blocks(block_indices: torch.Tensor, first: int) -> float:
    """Mean number of distinct blocks that ``DRAFT_TOKENS`` consecutive queries select per group.

    ``block_indices`` ``[S, G, topk]`` of one sequence; windows start at query ``first`` (= topk x block
    size: earlier queries select every visible block). Independent selections would give
    ``DRAFT_TOKENS * topk``; it is what an MTP decode step's tokens read together.
    """
    n_windows = (block_indices.shape[0] - first) // DRAFT_TOKENS
    windows = block_indices[first:first + n_windows * DRAFT_TOKENS].long().unflatten(0, (n_windows, DRAFT_TOKENS))
    windows = windows.transpose(1, 2).flatten(2).sort(-1).values  # [windows, G, DRAFT_TOKENS * topk]
    return ((windows[..., 1:] != windows[..., :-1]).sum(-1) + 1).float().mean().item()


def _export(work: Path, out: Path | None) -> None:
    """Copy the small results (plans, logs, results.json) to ``out``."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    for path in [*work.glob("*.json"), *work.glob("pretrain/log.jsonl"), *work.glob("runs/*/log.jsonl")]:
        target = out / path.relative_to(work).as_posix().replace("/", "__")
        target.write_bytes(path.read_bytes())


def report(args) -> None:
    """Plots and the README's results table, from the exported files in ``--results``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results_dir = args.results
    results = json.loads((results_dir / "results.json").read_text())
    logs = {path.name.split("__")[1]: [json.loads(line) for line in path.read_text().splitlines()]
            for path in results_dir.glob("runs__*__log.jsonl")}
    pretrain_log = [json.loads(line) for line in (results_dir / "pretrain__log.jsonl").read_text().splitlines()]

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in pretrain_log], [r["val_loss"] for r in pretrain_log], "k.-")
    left.set(title="dense pretraining (16K tokens)", xlabel="step", ylabel="validation loss (nats/byte)")
    for name, log in sorted(logs.items()):
        right.plot([r["step"] for r in log], [r["val_loss"] for r in log], ".-", label=name)
    right.set(title="continuation: same batches", xlabel="step", ylabel="validation loss (nats/byte)")
    right.legend()
    figure.tight_layout()
    figure.savefig(results_dir / "loss_curves.png", dpi=120)

    names = [n for n in results if not n.startswith("base")]
    figure, axes = plt.subplots(1, len(names) * 2 - 1, figsize=(4.2 * (len(names) * 2 - 1), 3.6))
    panels = [(n, "retrieval") for n in names] + [(n, "needle_block_selected") for n in names if n.startswith("msa")]
    for axis, (name, key) in zip(axes, panels):
        grid = np.array([[results[name][key][f"{length}/{depth:.1f}"] for length in EVAL_LENGTHS] for depth in DEPTHS])
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        axis.set(xticks=range(len(EVAL_LENGTHS)), xticklabels=[f"{n // 1024}K" for n in EVAL_LENGTHS],
                 yticks=range(len(DEPTHS)), yticklabels=[f"{round(d * 100)}%" for d in DEPTHS],
                 xlabel="context", ylabel="needle depth",
                 title=f"{name}\n{'retrieval accuracy' if key == 'retrieval' else 'needle block selected'}")
    figure.colorbar(image, ax=axes, shrink=0.8)
    figure.savefig(results_dir / "retrieval_heatmaps.png", dpi=110, bbox_inches="tight")

    lines = ["| model | " + " | ".join(f"loss @{n // 1024}K" for n in EVAL_LENGTHS)
             + f" | vs dense @{SEQ_LEN // 1024}K | retrieval | vs dense (95% CI) | retrieval up to "
             f"{SEQ_LEN // 1024}K | needle block selected | blocks read by {DRAFT_TOKENS} consecutive tokens |",
             "| --- |" + " --- |" * (len(EVAL_LENGTHS) + 6)]
    dense = results.get("dense")
    for name, record in results.items():
        losses = [record["loss"][str(n)] for n in EVAL_LENGTHS]
        train_length = str(SEQ_LEN)
        relative = f"{100 * (record['loss'][train_length] / dense['loss'][train_length] - 1):+.2f}%" if dense else "-"
        hits = _hits(record)
        trained = _hits(record, max_length=SEQ_LEN)
        versus = "-"
        if dense and name != "dense":  # the same samples for every model: a paired difference
            difference = hits - _hits(dense)
            half_width = 1.96 * difference.std(ddof=1) / np.sqrt(len(difference))
            versus = f"{100 * difference.mean():+.1f} ± {100 * half_width:.1f} pts"
        selected = record["needle_block_selected"]
        union = record.get("draft_union_blocks")
        lines.append(f"| {name} | " + " | ".join(f"{x:.4f}" for x in losses) + f" | {relative} | "
                     f"{100 * hits.mean():.1f}% | {versus} | {100 * trained.mean():.1f}% | "
                     + (f"{100 * np.mean(list(selected.values())):.1f}%" if selected else "-") + " | "
                     + (f"{union:.1f}" if union is not None else "-") + " |")
    (results_dir / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _hits(record: dict, max_length: int | None = None) -> np.ndarray:
    """Every retrieval sample's 0/1 outcome, in one fixed order (cells of lengths up to ``max_length``)."""
    return np.array([hit for cell, cell_hits in sorted(record["retrieval_hits"].items())
                     if max_length is None or int(cell.split("/")[0]) <= max_length for hit in cell_hits], float)


def _shrink() -> None:
    """--smoke: the same pipeline at toy sizes."""
    global SEQ_LEN, EVAL_LENGTHS, EVAL_TOKENS, DEPTHS, SAMPLES, VARIANTS
    SEQ_LEN, EVAL_LENGTHS, EVAL_TOKENS, DEPTHS, SAMPLES = 512, [256, 512], 1024, [0.0, 0.5, 1.0], 1
    MODEL.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    MODEL["num_key_value_heads"] = 2
    VARIANTS = {"dense": None, "msa_64x8": (32, 4, 6), "msa_128x16": (64, 2, 4),
                "msa_128x16_selection_kl": (64, 2, None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["pretrain", "continue", "evaluate", "report"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/msa-quality"))
    parser.add_argument("--out", type=Path, default=None, help="where the small results are copied")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of a training stage")
    parser.add_argument("--plan-s", type=float, default=700.0,
                        help="continue: training seconds the planned steps of all runs fill (over two commands)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes that run on a CPU (checks the pipeline)")
    args = parser.parse_args()
    if args.smoke:
        _shrink()
    elif args.stage != "report" and not torch.cuda.is_available():
        raise SystemExit("the study's training and evaluation stages need a CUDA GPU (or --smoke)")
    {"pretrain": pretrain, "continue": continue_runs, "evaluate": evaluate, "report": report}[args.stage](args)


if __name__ == "__main__":
    main()
