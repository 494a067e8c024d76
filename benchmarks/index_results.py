"""Regenerate benchmarks/results/INDEX.md from the run folders' provenance.json and data files.

    python benchmarks/index_results.py

One row per folder of ``results/``: its date, device, commit, what it
measured and the command, as the folder's ``provenance.json`` records them,
and a headline computed from the folder's data files of the kinds in
``HEADLINES`` and from the pytest summaries of its logs (other runs' results
are in their notes and files). Standard library only; runs on a CPU in well
under a second. Rerun it after adding or editing a run folder; the index is
never edited by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
INDEX = RESULTS / "INDEX.md"
PYTEST_SUMMARY = re.compile(r"^=*\s*\d+ (passed|failed|errors?)\b.* in [\d.]+s")  # pytest's last line
OUTCOMES = re.compile(r"(\d+) (passed|failed|skipped|errors?)\b")


def fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n < 1 << 20 else f"{n >> 20}M"


def span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}x" if len(values) > 1 else f"{values[0]:.2f}x"


def kernels_headline(record: dict) -> str:
    parts = []
    for key, label in (("prefill_speedup_vs_cudnn", "prefill"), ("train_speedup_vs_cudnn", "training step")):
        cells = [f"{fmt_len(row['seqlen'])} {row[key]:.2f}x" for row in record["rows"] if key in row]
        if cells:
            parts.append(f"{label} vs cuDNN: " + ", ".join(cells))
    return "; ".join(parts)


def inference_headline(record: dict) -> str:
    parts = []
    for part in ("decode", "prefill"):
        speedups = [row["speedup"] for row in record[part]]
        if speedups:
            parts.append(f"{part} vs dense {span(speedups)} over {len(speedups)} case" + "s" * (len(speedups) > 1))
    return "; ".join(parts)


def msa_bench_headline(record: dict) -> str:
    return "MSA vs dense: " + ", ".join(f"{fmt_len(row['seqlen'])} {row['speedup']:.2f}x" for row in record["rows"])


def hf_generate_headline(record: dict) -> str:
    rows = record["rows"]
    lengths = f"{fmt_len(rows[0]['seqlen'])}-{fmt_len(rows[-1]['seqlen'])}"
    return (f"decode vs dense {span([row['decode_speedup'] for row in rows])}, "
            f"prefill vs dense {span([row['prefill_speedup'] for row in rows])} ({lengths})")


def hopper_ab_headline(record: dict) -> str:
    cells = [f"{fmt_len(row['seqlen'])} {row['triton']['median_ms'] / row['gluon']['median_ms']:.2f}x"
             for row in record["rows"]]
    return "KV-outer forward with the Gluon vs the Triton partials: " + ", ".join(cells)


def model_step_headline(record: dict) -> str:
    cells = [f"{fmt_len(row['seqlen'])} {row['msa_speedup']:.2f}x" for row in record["rows"]]
    return "model training step, MSA vs dense: " + ", ".join(cells)


# data file kind (its "benchmark" field, else its file name) -> the headline of one such file
HEADLINES = {"kernels": kernels_headline, "msa inference": inference_headline, "msa bench": msa_bench_headline,
             "hf_generate": hf_generate_headline, "hopper_ab": hopper_ab_headline,
             "model_step": model_step_headline}
STANDARD_NAMES = {"kernels", "inference", "msa_bench", "hf_generate", "hopper_ab", "model_step"}  # not repeated in labels


def headline(folder: Path) -> str:
    """The headline of every data file of a known kind, labelled by its path in the folder where it has several,
    and the test outcomes its logs record."""
    parts = []
    for path in sorted(p for p in folder.rglob("*.json") if p.name != "provenance.json"):
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            continue
        summarize = HEADLINES.get(record.get("benchmark", path.stem))
        text = summarize(record) if summarize else ""
        if text:
            label = path.relative_to(folder).with_suffix("")
            label = label.parent if label.name in STANDARD_NAMES else label
            parts.append(text if str(label) == "." else f"{label}: {text}")
    return "; ".join(parts + pytest_outcomes(folder))


def pytest_outcomes(folder: Path) -> list[str]:
    """The outcome counts of each pytest log in the folder (its last summary line)."""
    outcomes = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix in (".log", ".txt")):
        summaries = [line for line in path.read_text(errors="replace").splitlines() if PYTEST_SUMMARY.match(line)]
        if summaries:
            counts = ", ".join(f"{count} {outcome}" for count, outcome in OUTCOMES.findall(summaries[-1]))
            outcomes.append(f"{path.relative_to(folder)}: {counts}")
    return outcomes


def command_cell(provenance: dict, folder: Path) -> str:
    """The command, and the scripts it ran that are now in git history only (``path@commit``)."""
    prefix = f"{folder.relative_to(RESULTS.parents[1])}/"
    scripts = [script.removeprefix(prefix) for script in provenance.get("scripts", [])]
    return provenance["command"] + (f" (scripts: {', '.join(scripts)})" if scripts else "")


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "-"


def row(folder: Path) -> str:
    path = folder / "provenance.json"
    if not path.exists():
        return f"| [{folder.name}]({folder.name}/) | - | - | - | no provenance.json | - | {cell(headline(folder))} |"
    provenance = json.loads(path.read_text())
    cells = [provenance["date"], provenance["device"], provenance["commit"], provenance.get("measured", ""),
             command_cell(provenance, folder), headline(folder)]
    return f"| [{folder.name}]({folder.name}/) | " + " | ".join(map(cell, cells)) + " |"


def main() -> None:
    folders = sorted((p for p in RESULTS.iterdir() if p.is_dir()), key=lambda p: (int(p.name.split("-")[4]), p.name))
    lines = [
        "# Benchmark runs\n",
        "Generated by `benchmarks/index_results.py` from each folder's `provenance.json` and data files; do not edit. "
        "`commit`: the tree the run measured (the folder's `provenance.json` says more in its `note`). A script "
        "named `path@commit` is no longer in the tree: `git show <commit>:benchmarks/results/<run>/<path>`. "
        "`headline`: computed from the folder's `kernels.json` (speed-ups over cuDNN), `inference.json` (over "
        "dense attention), `msa_bench.json`, `hf_generate.json`, `hopper_ab.json` or `model_step.json` (a whole model's training step against dense), and the outcome counts of "
        "the pytest logs; `-` where it has none of them (its note gives the result).\n",
        "| run | date | device | commit | measured | command | headline |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [row(folder) for folder in folders]
    INDEX.write_text("\n".join(lines) + "\n")
    print(f"wrote {INDEX} ({len(folders)} runs)")


if __name__ == "__main__":
    main()
