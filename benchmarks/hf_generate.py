"""Hugging Face ``generate()`` of a converted model against the same dense model, at long prompts.

The model has SmolLM2-135M's shape (Llama: 30 layers, hidden 576, 9 query / 3
KV heads of dim 64, vocab 49,152), random weights, bf16 on one GPU; the MSA
model is a copy converted by ``msa.integrations.hf.convert`` (its
``generate()`` runs over an ``MSACache``: paged prefill and decode kernels).
Dense runs SDPA through transformers' default dynamic cache and its static
cache (not compiled, as MSA is not); the faster of the two is the baseline. Per prompt length, batch one,
greedy: ``generate(max_new_tokens=1)`` (the prefill) and
``generate(max_new_tokens=1 + N)``, each timed as a whole call (host clock after
a device synchronisation; one warm-up call first), median of ``--repeats``;
decode time per token = the difference / N. The MSA tokens are checked
against a teacher-forced full forward of the generated sequence (the share of
the N + 1 new tokens that are its argmax). Writes ``hf_generate.json``.

    PYTHONPATH=src python benchmarks/hf_generate.py --out benchmarks/results/<run>
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# run as a script, benchmarks/ is sys.path[0]: its kernels.py would shadow the `kernels` package transformers probes
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
import transformers  # noqa: E402
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from msa.cli.bench import git_commit
from msa.integrations import hf

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True)


def timed_generate(model, prompt: torch.Tensor, new_tokens: int, repeats: int, **options) -> tuple[float, torch.Tensor]:
    """Median seconds of ``model.generate`` producing exactly ``new_tokens`` tokens, and its output."""
    def call():
        return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              **options)

    call()
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        output = call()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), output


def measure(model, prompt: torch.Tensor, new_tokens: int, repeats: int, **options) -> dict:
    prefill_s, _ = timed_generate(model, prompt, 1, repeats, **options)
    total_s, output = timed_generate(model, prompt, 1 + new_tokens, repeats, **options)
    decode_s = (total_s - prefill_s) / new_tokens
    return dict(prefill_ms=1e3 * prefill_s, decode_ms_per_token=1e3 * decode_s, decode_tokens_per_s=1 / decode_s,
                generate_s=total_s, output=output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", default="8192,32768,65536")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    seqlens = [int(s) for s in args.seqlens.split(",")]

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMOLLM2_135M, max_position_embeddings=max(seqlens) + args.new_tokens + 1,
                                      eos_token_id=None, bos_token_id=None, pad_token_id=None)
    dense = transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    dense.generation_config.eos_token_id = None
    sparse = hf.convert(copy.deepcopy(dense), block_size=args.block_size, topk=args.topk)

    rows = []
    with Progress(console=Console(stderr=True)) as progress, torch.no_grad():
        task = progress.add_task("generate", total=len(seqlens))
        for seqlen in seqlens:
            prompt = torch.randint(0, config.vocab_size, (1, seqlen), device="cuda")
            baselines = {name: measure(dense, prompt, args.new_tokens, args.repeats, **options)
                         for name, options in (("dynamic", {}), ("static", dict(cache_implementation="static", disable_compile=True)))}
            msa = measure(sparse, prompt, args.new_tokens, args.repeats)
            generated = msa.pop("output")
            teacher_forced = sparse(generated[:, :-1]).logits[0, seqlen - 1:].argmax(-1)
            agreement = (teacher_forced == generated[0, seqlen:]).double().mean().item()
            for baseline in baselines.values():
                del baseline["output"]
            best = min(baselines, key=lambda name: baselines[name]["decode_ms_per_token"])
            rows.append(dict(seqlen=seqlen, msa=msa, dense=baselines, dense_best=best,
                             decode_speedup=baselines[best]["decode_ms_per_token"] / msa["decode_ms_per_token"],
                             prefill_speedup=min(b["prefill_ms"] for b in baselines.values()) / msa["prefill_ms"],
                             greedy_agreement_with_full_forward=agreement))
            progress.advance(task)

    record = dict(benchmark="hf_generate", date=datetime.date.today().isoformat(), commit=git_commit(),
                  device=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                  model=dict(SMOLLM2_135M, dtype="bfloat16", weights="random"),
                  msa=dict(block_size=args.block_size, topk=args.topk), new_tokens=args.new_tokens,
                  repeats=args.repeats, rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hf_generate.json").write_text(json.dumps(record, indent=2))

    table = Table(title=f"HF generate, SmolLM2-135M shape, MSA {args.block_size} x {args.topk} ({record['device']})")
    for column in ("prompt", "dense prefill ms", "MSA prefill ms", "dense decode tok/s", "MSA decode tok/s",
                   "decode speed-up", "greedy = full forward"):
        table.add_column(column, justify="right")
    for row in rows:
        best = row["dense"][row["dense_best"]]
        table.add_row(str(row["seqlen"]), f"{min(b['prefill_ms'] for b in row['dense'].values()):.0f}",
                      f"{row['msa']['prefill_ms']:.0f}", f"{best['decode_tokens_per_s']:.0f} ({row['dense_best']})",
                      f"{row['msa']['decode_tokens_per_s']:.0f}", f"{row['decode_speedup']:.2f}x",
                      f"{100 * row['greedy_agreement_with_full_forward']:.0f}%")
    Console().print(table)


if __name__ == "__main__":
    main()
