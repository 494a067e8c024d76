"""CPU benchmark: MSA's PyTorch path against dense causal attention through SDPA, forward and training step.

For each sequence length, on the ``msa bench`` CPU layer (Hq=8, G=2, D=Di=64,
block 64, topk 8, float32, B=1, random inputs) and in the same process:

- MSA forward: ``select_blocks`` + ``sparse_attention``;
- MSA training step: the selection (no gradient), ``sparse_attention``
  forward + backward and ``index_kl_loss`` (given the attention's LSE) with
  its gradients, as ``msa.nn`` trains;
- dense: ``scaled_dot_product_attention`` causal (``msa.dense_attention``),
  forward, and forward + backward;
- the parts of the MSA step (selection, attention forward, attention forward +
  backward, KL loss + gradients), to show where the time goes;
- one decode step of the layer (one new token after ``S`` cached ones):
  ``PagedSparseAttention`` over a ``PagedKVCache`` (the PyTorch path: the
  index scan, Top-k and attention over the selected pages) against
  ``DenseKVAttention`` (SDPA over a contiguous cache), as ``msa generate``
  serves a model.

Each time is the median of ``--repeats`` runs after ``--warmup``. Writes
``cpu.json`` under ``--out``: the machine (``platform``,
``torch.__config__.parallel_info()``), date, commit, command and rows.

    PYTHONPATH=src python benchmarks/cpu.py --out benchmarks/results/<run>
    PYTHONPATH=src python benchmarks/cpu.py --out benchmarks/results/<run> --report   # cpu.md from cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import msa
from msa.cli.bench import CPU_DEFAULTS, attended_fraction, git_commit
from msa.cli.timing import median_ms
from msa.inference import DenseKVAttention, PagedKVCache, PagedSparseAttention

CPU = torch.device("cpu")


def cpu_model() -> str:
    """The processor's name from /proc/cpuinfo, else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bench_seqlen(layer: dict, seqlen: int, warmup: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(seqlen)

    def randn(heads, dim):
        return torch.randn(1, seqlen, heads, dim, generator=generator)

    q, k, v = randn(layer["heads"], layer["head_dim"]), randn(layer["kv_heads"], layer["head_dim"]), \
        randn(layer["kv_heads"], layer["head_dim"])
    index_q, index_k = randn(layer["kv_heads"], layer["index_head_dim"]), randn(1, layer["index_head_dim"])
    size = dict(block_size=layer["block_size"])
    grad = torch.randn_like(q)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, index_q, index_k)]

    def time_ms(fn):
        return median_ms(fn, CPU, warmup=warmup, repeats=repeats)

    def select():
        return msa.select_blocks(index_q, index_k, topk=layer["topk"], **size)

    def msa_forward():
        return msa.sparse_attention(q, k, v, select(), **size)

    def attention_step(blocks):
        out, lse = msa.sparse_attention(*leaves[:3], blocks, return_lse=True, **size)
        out.backward(grad)
        return lse

    def kl_step(blocks, main_lse):
        msa.index_kl_loss(*leaves[:2], *leaves[3:], blocks, main_lse=main_lse, **size).backward()

    def msa_train():
        blocks = select()
        kl_step(blocks, attention_step(blocks))

    def dense_train():
        msa.dense_attention(*leaves[:3]).backward(grad)

    blocks = select()
    row = {"seqlen": seqlen, "attended_fraction": attended_fraction(blocks, layer["block_size"])}
    with torch.no_grad():
        row["dense_fwd_ms"] = time_ms(lambda: msa.dense_attention(q, k, v))
        row["msa_fwd_ms"] = time_ms(msa_forward)
        row["select_ms"] = time_ms(select)
        row["attention_fwd_ms"] = time_ms(lambda: msa.sparse_attention(q, k, v, blocks, **size))
    row["dense_train_ms"] = time_ms(dense_train)
    row["msa_train_ms"] = time_ms(msa_train)
    row["attention_fwd_bwd_ms"] = time_ms(lambda: attention_step(blocks))
    with torch.no_grad():
        main_lse = msa.sparse_attention(q, k, v, blocks, return_lse=True, **size)[1]
    row["kl_fwd_bwd_ms"] = time_ms(lambda: kl_step(blocks, main_lse))
    row["msa_decode_ms"], row["dense_decode_ms"] = decode_step_ms(layer, seqlen, warmup, repeats)
    row["fwd_speedup"] = row["dense_fwd_ms"] / row["msa_fwd_ms"]
    row["train_speedup"] = row["dense_train_ms"] / row["msa_train_ms"]
    row["decode_speedup"] = row["dense_decode_ms"] / row["msa_decode_ms"]
    return row


def decode_step_ms(layer: dict, seqlen: int, warmup: int, repeats: int) -> tuple[float, float]:
    """One-token decode steps after ``seqlen`` cached tokens (random keys): MSA's and dense attention's, ms."""
    heads, groups, head_dim, index_dim = layer["heads"], layer["kv_heads"], layer["head_dim"], layer["index_head_dim"]
    block_size, n_steps = layer["block_size"], warmup + repeats
    capacity = seqlen + n_steps
    generator = torch.Generator().manual_seed(seqlen + 1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    pages = -(-capacity // block_size)
    cache = PagedKVCache(num_layers=1, num_pages=pages, block_size=block_size, num_kv_heads=groups,
                         head_dim=head_dim, index_head_dim=index_dim, max_requests=1, max_pages_per_request=pages,
                         dtype=torch.float32)
    sparse = PagedSparseAttention(cache, num_heads=heads, topk=layer["topk"])
    dense = DenseKVAttention(num_layers=1, num_heads=heads, num_kv_heads=groups, head_dim=head_dim, max_requests=1,
                             max_seq_len=capacity, dtype=torch.float32)
    sparse_request, dense_request = cache.add_request(), dense.add_request()
    prefix_k, prefix_v = randn(seqlen, groups, head_dim), randn(seqlen, groups, head_dim)
    cache.reserve(sparse_request, seqlen)  # the prompt's keys, written straight into the pools
    slots = cache.slots(sparse_request, 0, seqlen)
    cache.k[0].view(-1, groups, head_dim).index_copy_(0, slots, prefix_k)
    cache.v[0].view(-1, groups, head_dim).index_copy_(0, slots, prefix_v)
    cache.write_index_keys(0, slots, randn(seqlen, index_dim))
    dense.plan([dense_request], [seqlen])
    dense.k[0, dense_request, :, :seqlen], dense.v[0, dense_request, :, :seqlen] = (
        prefix_k.transpose(0, 1), prefix_v.transpose(0, 1))

    def step(attention, request):
        def run():
            attention.plan([request], [1])
            attention.run(0, randn(1, heads, head_dim), randn(1, groups, head_dim), randn(1, groups, head_dim),
                          randn(1, groups, index_dim), randn(1, index_dim))
        return median_ms(run, CPU, warmup=warmup, repeats=repeats)

    with torch.no_grad():
        return step(sparse, sparse_request), step(dense, dense_request)


def _cell(key: str, value) -> str:
    if key == "seqlen":
        return str(value)
    if key == "attended_fraction":
        return f"{100 * value:.1f}%"
    if key.endswith("speedup"):
        return f"{value:.2f}x"
    return f"{value:.2f}" if key.endswith("decode_ms") else f"{value:.0f}"


def print_tables(console: Console, rows: list[dict], machine: str) -> None:
    """The speed-ups, then where MSA's time goes."""
    tables = {
        f"MSA (PyTorch CPU path) vs dense SDPA, ms ({machine})": {
            "seq len": "seqlen", "dense fwd": "dense_fwd_ms", "MSA fwd": "msa_fwd_ms", "speed-up": "fwd_speedup",
            "dense train": "dense_train_ms", "MSA train": "msa_train_ms", "speed-up ": "train_speedup"},
        "One decode step of the layer after S cached tokens, ms": {
            "S": "seqlen", "dense (contiguous cache)": "dense_decode_ms", "MSA (paged cache)": "msa_decode_ms",
            "speed-up": "decode_speedup"},
        "MSA's parts, ms": {
            "seq len": "seqlen", "keys attended": "attended_fraction", "select": "select_ms",
            "attention fwd": "attention_fwd_ms", "attention fwd+bwd": "attention_fwd_bwd_ms",
            "KL fwd+bwd": "kl_fwd_bwd_ms"},
    }
    for title, columns in tables.items():
        table = Table(title=title)
        for column in columns:
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(*(_cell(key, row[key]) for key in columns.values()))
        console.print(table)


def markdown_table(record: dict) -> str:
    """The speed-ups of a stored ``cpu.json`` as the README's markdown table."""
    lines = ["| tokens | forward (select + attention) | training step (+ KL loss) | one decode step |",
             "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {row['seqlen'] // 1024}K | {row['fwd_speedup']:.2f}x | {row['train_speedup']:.2f}x | "
              f"{row['decode_speedup']:.2f}x |" for row in record["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for cpu.json")
    parser.add_argument("--report", action="store_true",
                        help="write cpu.md (the README's table) from the cpu.json in --out, without measuring")
    parser.add_argument("--seqlens", default="4096,8192,16384,32768")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.report:
        (args.out / "cpu.md").write_text(markdown_table(json.loads((args.out / "cpu.json").read_text())))
        return
    layer = {name: CPU_DEFAULTS[name] for name in ("heads", "kv_heads", "head_dim", "index_head_dim", "block_size",
                                                    "topk", "dtype")}
    console = Console()
    record = {"benchmark": "cpu", "device": cpu_model(), "platform": platform.platform(),
              "python": platform.python_version(), "torch": torch.__version__,
              "parallel_info": torch.__config__.parallel_info(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "command": shlex.join([Path(sys.executable).name, *sys.argv]),
              "layer": layer, "batch": 1, "warmup": args.warmup, "repeats": args.repeats, "rows": []}
    path = args.out / "cpu.json"
    args.out.mkdir(parents=True, exist_ok=True)
    seqlens = [int(s) for s in args.seqlens.split(",")]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("cpu", total=len(seqlens))
        for seqlen in seqlens:
            progress.update(task, description=f"S={seqlen}")
            record["rows"].append(bench_seqlen(layer, seqlen, args.warmup, args.repeats))
            path.write_text(json.dumps(record, indent=2))  # after every length: a cut-off run keeps its rows
            progress.advance(task)
    print_tables(console, record["rows"], f"{record['device']}, {torch.get_num_threads()} threads")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
