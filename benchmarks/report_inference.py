"""Regenerate benchmarks/INFERENCE.md and benchmarks/decode_speedup.png from recorded inference runs.

    python benchmarks/report_inference.py benchmarks/results/<run> [more runs ...]

Each run folder holds ``inference.json`` (benchmarks/inference.py) and may hold
``provenance.json`` (the commit the tree was at, where the recorded one is
wrong). Rows of later runs replace rows of the same case from earlier ones. An
argument may join folders with ``+``: samples of one measurement (the same
kernels), of which each decode case shows its median sample by speed-up (the
lower middle one of an even count).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
DECODE_TARGET, SCAN_TARGET, LONG_CONTEXT = 6.0, 0.8, 128 * 1024


def load(arguments: list[str]):
    runs, decode, prefill = [], {}, {}
    for argument in arguments:
        samples = {}  # decode case -> its rows in the folders of this argument
        for folder in map(Path, argument.split("+")):
            record = json.loads((folder / "inference.json").read_text())
            provenance = next((p for p in (folder / "provenance.json", folder.parent / "provenance.json")
                               if p.exists()), None)  # a run's variants are sub-folders of one results folder
            commit = json.loads(provenance.read_text())["commit"] if provenance else record["commit"]
            name = folder.name if folder.parent.name == "results" else f"{folder.parent.name}/{folder.name}"
            run = dict(folder=name, number=name.split("-")[4], device=record["device"], date=record["date"],
                       commit=commit, copy_gbps=record["copy_gbps"])
            runs.append(run)
            qualifiers = []
            if record.get("selections", "independent") != "independent":
                tiles = record["attention_tokens"]  # None: PagedSparseAttention's choice per case
                qualifiers.append("overlapping selections" + (f", {tiles}-token tiles" if tiles else ""))
            if record.get("index_dtype", "bf16") != "bf16":
                qualifiers.append(f"{record['index_dtype'].upper()} index keys")
            suite_label = ", ".join(["{}", *qualifiers])
            for row in record["decode"]:
                tiles = row.get("attention_tokens", record.get("attention_tokens", 1))  # recorded per row since 49
                samples.setdefault((suite_label.format(row["suite"]), row["batch"], row["seqlen"]), []).append(
                    dict(row, run=run, tiles=tiles))
            for row in record["prefill"]:
                prefill[row["case_id"]] = dict(row, run=run)
        for case, rows in samples.items():
            rows.sort(key=lambda row: row["speedup"])
            decode[case] = dict(rows[(len(rows) - 1) // 2], samples=len(rows))
    return runs, decode, prefill


def fmt_len(n: int) -> str:
    """128K, 1M for powers-of-two lengths; 200k for the suite's decimal ones."""
    if n % 1024:
        return f"{n / 1000:g}k"
    return f"{n // 1024}K" if n < 1 << 20 else f"{n >> 20}M"


def median_of(row: dict) -> str:
    return f" (median of {row['samples']})" if row["samples"] > 1 else ""


def decode_table(decode: dict) -> list[str]:
    """One row per decode case."""
    lines = ["| suite | batch | context | MSA ms | dense ms (backend) | speed-up | bytes ratio | index scan ms "
             "| scan GB/s (of copy) | top-k ms | attention ms | tile tokens | run |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (suite, batch, seqlen), row in sorted(decode.items(), key=lambda item: (item[0][0] != "decode", item[0])):
        copy = row["run"]["copy_gbps"]
        lines.append(
            f"| {suite} | {batch} | {fmt_len(seqlen)} | {row['msa_ms']:.3f} | {row['dense_ms']:.3f} "
            f"({row['dense_backend']}) | **{row['speedup']:.2f}x** | {row['dense_bytes'] / row['msa_bytes']:.2f}x | "
            f"{row['scan_ms']:.3f} | {row['scan_gbps']:.0f} ({100 * row['scan_gbps'] / copy:.0f}%) | "
            f"{row['topk_ms']:.3f} | {row['attention_ms']:.3f} | {row['tiles']} | {row['run']['number']}"
            f"{median_of(row)} |")
    return lines


def prefill_tables(prefill: dict) -> tuple[list[str], dict]:
    header = ["| case | tag | new tokens | cached | weight | MSA ms | dense ms (backend) | speed-up |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    lines = list(header)
    for row in sorted(prefill.values(), key=lambda r: (r["tag"] != "representative", -r["weight"])):
        lines.append(f"| {row['case_id'][8:16]} | {row['tag']} | {row['query_len']} | {row['prefix_len']} | "
                     f"{row['weight']} | {row['msa_ms']:.2f} | {row['dense_ms']:.2f} ({row['dense_backend']}) | "
                     f"{row['speedup']:.2f}x |")
    summaries = {}
    for tag in ("representative", "hot"):
        rows = [r for r in prefill.values() if r["tag"] == tag]
        weight = sum(r["weight"] for r in rows)
        summaries[tag] = dict(rows=len(rows), weight=weight,
                              msa_ms=sum(r["weight"] * r["msa_ms"] for r in rows) / max(1, weight),
                              dense_ms=sum(r["weight"] * r["dense_ms"] for r in rows) / max(1, weight))
    return lines, summaries


def plot(decode: dict, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4.2))
    # the suite with selections that overlap like a trained model's, at the default tiles, when it was run
    main = next((name for name in ("decode, overlapping selections", "decode") if any(
        suite == name for suite, _, _ in decode)), "decode")
    for batch in sorted({b for suite, b, _ in decode if suite == main}):
        rows = sorted((s, r["speedup"]) for (suite, b, s), r in decode.items() if suite == main and b == batch)
        axis.plot([s for s, _ in rows], [x for _, x in rows], "o-", label=f"{main}, batch {batch}")
    long_suites = sorted({name for name, _, _ in decode if name.startswith("long")})
    for suite, style in zip(long_suites, ("ks--", "r^--", "mv--", "c<--", "gD--", "y>--")):
        rows = sorted((s, r["speedup"]) for (name, b, s), r in decode.items() if name == suite)
        axis.plot([s for s, _ in rows], [x for _, x in rows], style, label=f"{suite} (batch 8/4/2)")
    axis.axhline(DECODE_TARGET, color="gray", linestyle=":", label=f"target {DECODE_TARGET:.0f}x at 128K+")
    axis.axhline(1.0, color="lightgray", linewidth=0.8)
    axis.set(xscale="log", xlabel="context (tokens)", ylabel="speed-up over dense decode",
             title="MTP decode (8 tokens/request), MSA vs the fastest SDPA backend")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders; folder+folder+...: samples of one measurement")
    args = parser.parse_args()
    runs, decode, prefill = load(args.runs)
    long_rows = [dict(r, suite=suite) for (suite, _, s), r in decode.items() if s >= LONG_CONTEXT]
    prefill_lines, summaries = prefill_tables(prefill)
    lines = ["# Inference benchmark results\n",
             "Generated by `benchmarks/report_inference.py` from the runs below; do not edit by hand. Layer: 64 "
             "query heads, 4 KV heads, head dim 128, index head dim 128, block (page) 128, top-k 16, bf16 cache. "
             "Method: `benchmarks/inference.py` (CUDA-graph replays, cold L2, median).\n",
             "| run | device | date | commit | copy GB/s |", "| --- | --- | --- | --- | ---: |"]
    lines += [f"| {r['folder']} | {r['device']} | {r['date']} | {r['commit']} | {r['copy_gbps']:.0f} |" for r in runs]
    lines += ["\n## Targets\n", "| target | measured | met |", "| --- | --- | --- |"]
    long_rows.sort(key=lambda r: (r["suite"] != r["suite"].split(",")[0], r["seqlen"], r["batch"]))
    for row in long_rows:
        selections = " (" + row["suite"].split(", ", 1)[1] + ")" if ", " in row["suite"] else ""
        lines.append(f"| decode >= {DECODE_TARGET:.0f}x dense at {fmt_len(row['seqlen'])} (batch {row['batch']})"
                     f"{selections} | {row['speedup']:.2f}x{median_of(row)} | "
                     f"{'yes' if row['speedup'] >= DECODE_TARGET else 'no'} |")
    for row in long_rows:
        share = row["scan_gbps"] / row["run"]["copy_gbps"]
        selections = " (" + row["suite"].split(", ", 1)[1] + ")" if ", " in row["suite"] else ""
        lines.append(f"| index scan >= {100 * SCAN_TARGET:.0f}% of the copy bandwidth at {fmt_len(row['seqlen'])} "
                     f"(batch {row['batch']}){selections} | {100 * share:.0f}% | "
                     f"{'yes' if share >= SCAN_TARGET else 'no'} |")
    for tag, summary in summaries.items():
        if summary["rows"]:
            lines.append(f"| production prefill, weighted mean of {summary['rows']} {tag} rows | MSA "
                         f"{summary['msa_ms']:.2f} ms vs dense {summary['dense_ms']:.2f} ms = "
                         f"{summary['dense_ms'] / summary['msa_ms']:.2f}x | (no target) |")
    lines += ["\n## Decode suite\n",
              "`bytes ratio`: bytes dense decode reads (K and V) over bytes MSA must read (index keys + the "
              "distinct selected blocks of each (request, group); runs before 2026-11-23 04:30 counted every "
              "(token, group)'s blocks, the same within a few % for independent selections): the speed-up the "
              "memory traffic allows. Suites without a qualifier: independent random selections (the 8 tokens of "
              "a request share almost no block). `overlapping selections`: each request's 8 index queries mixed "
              "with a shared one so that they select as many distinct blocks per group as the trained model "
              "of experiments/quality does (`benchmarks/inference.py --selections overlapping`). `FP8 index "
              "keys`: the index-key cache in FP8 with a scale per key (`PagedKVCache(index_dtype="
              "torch.float8_e4m3fn)`, `msa.fp8`; K and V stay bf16; `--index-dtype fp8`): the scan reads Di + 4 "
              "bytes per key instead of 2 Di. `tile tokens`: tokens per sparse-attention tile (1: each token loads its "
              "own blocks; 8: a request's 8 tokens load each block of their union once); suites without a "
              "tile qualifier run `PagedSparseAttention`'s default choice (8-token tiles for decode batches that "
              "fill the GPU). `run`: the number of the results folder; `(median of n)`: the median sample of n "
              "samples of one measurement (by speed-up).\n",
              "![decode speed-up](decode_speedup.png)\n", *decode_table(decode),
              "\n## Production prefill (paged)\n", *prefill_lines]
    (HERE / "INFERENCE.md").write_text("\n".join(lines) + "\n")
    plot(decode, HERE / "decode_speedup.png")
    print("\n".join(lines[:40]))


if __name__ == "__main__":
    main()
