"""``msa bench``: MSA (indexer + sparse attention) against dense causal attention.

Times the forward pass of both on the device present, checks the MSA output
against the float64 reference where that is affordable, and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import msa
from msa.cli import arguments
from msa.cli.timing import median_ms
from msa.ops.backend import unsupported_reason, use_triton

# Defaults: on a CPU, a small layer at lengths that run in about a minute on 2 cores and show where MSA wins
# (benchmarks/results/2026-12-04-cpu-100-pytorch-path); the paper's layer on a GPU.
CPU_DEFAULTS = dict(seqlens=[4096, 8192, 16384], heads=8, kv_heads=2, head_dim=64, index_head_dim=64,
                    block_size=64, topk=8, dtype="float32")
GPU_DEFAULTS = dict(seqlens=[8192, 32768, 131072], heads=64, kv_heads=4, head_dim=128, index_head_dim=128,
                    block_size=128, topk=16, dtype="bfloat16")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def add_parser(commands) -> None:
    parser = commands.add_parser("bench", help="time MSA against dense attention and check it against the reference",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=arguments.device, default=None,
                        help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--seqlens", type=arguments.positive_int_list, default=None,
                        help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=arguments.positive_int, default=1)
    parser.add_argument("--heads", type=arguments.positive_int, default=None,
                        help="query heads Hq (a multiple of --kv-heads)")
    parser.add_argument("--kv-heads", type=arguments.positive_int, default=None, help="KV heads = GQA groups G")
    parser.add_argument("--head-dim", type=arguments.positive_int, default=None)
    parser.add_argument("--index-head-dim", type=arguments.positive_int, default=None)
    parser.add_argument("--block-size", type=arguments.power_of_two, default=None)
    parser.add_argument("--topk", type=arguments.positive_int, default=None, help="blocks per (query, group)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--repeats", type=arguments.positive_int, default=5,
                        help="timed runs per measurement (median reported)")
    parser.add_argument("--check-max-seqlen", type=arguments.non_negative_int, default=4096,
                        help="check against the float64 reference up to this length (0: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.set_defaults(run=run, error=parser.error)


def _resolve(args) -> dict:
    """The arguments with the device's defaults filled in; ``args.error`` (exit status 2) for inconsistent ones."""
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    config = {name: getattr(args, name) if getattr(args, name) is not None else value
              for name, value in defaults.items()}
    if config["heads"] % config["kv_heads"]:
        args.error(f"--heads ({config['heads']}) must be a multiple of --kv-heads ({config['kv_heads']})")
    if args.json is not None and args.json.is_dir():
        args.error(f"--json must name a file, got the directory {str(args.json)!r}")
    config.update(device=device, batch=args.batch)
    return config


def msa_path(config: dict) -> str:
    """Which implementation the MSA ops run for ``config``: the Triton kernels or the PyTorch path."""
    reason = unsupported_reason(dtype=DTYPES[config["dtype"]], head_dim=config["head_dim"],
                                index_dim=config["index_head_dim"], block_size=config["block_size"],
                                topk=config["topk"], heads_per_group=config["heads"] // config["kv_heads"])
    if use_triton("sparse_attention", config["device"], reason):
        return "Triton kernels"
    return f"PyTorch {config['device'].type.upper()} path"


def attended_fraction(block_indices: torch.Tensor, block_size: int) -> float:
    """Keys attended by MSA over keys attended by dense causal attention (``[B, S, G, K]`` input)."""
    seqlen = block_indices.shape[1]
    positions = torch.arange(seqlen, device=block_indices.device)[None, :, None, None]
    keys = (positions - block_indices.long() * block_size + 1).clamp(0, block_size)
    keys = keys.masked_fill(block_indices < 0, 0)
    dense_keys = block_indices.shape[0] * block_indices.shape[2] * seqlen * (seqlen + 1) / 2
    return keys.sum().item() / dense_keys


def git_commit() -> str | None:
    """``$MSA_COMMIT`` when set (the GPU machine's copy of the tree: its .git, if any, is not this tree's),
    else the checkout's commit."""
    if os.environ.get("MSA_COMMIT"):
        return os.environ["MSA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _check(inputs, block_indices, out, block_size) -> dict:
    """Relative L2 error of ``out`` against the float64 reference on the same selection,
    and the fraction of (query, group) rows whose selection equals the float64 one."""
    q, k, v, index_q, index_k = (x.double() for x in inputs)
    ref_out = msa.reference.sparse_attention(q, k, v, block_indices, block_size=block_size)
    ref_blocks = msa.reference.select_blocks(index_q, index_k, block_size=block_size, topk=block_indices.shape[-1])
    same = (block_indices.sort(-1).values == ref_blocks.sort(-1).values).all(-1)
    return {"rel_err": ((out.double() - ref_out).norm() / ref_out.norm()).item(),
            "selection_match": same.double().mean().item()}


def run(args) -> int:
    config = _resolve(args)
    device, dtype = config["device"], DTYPES[config["dtype"]]
    batch, heads, groups = config["batch"], config["heads"], config["kv_heads"]
    block_size, topk = config["block_size"], config["topk"]
    console = Console()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("bench", total=len(config["seqlens"]))
        for seqlen in config["seqlens"]:
            progress.update(task, description=f"S={seqlen}: inputs")

            def randn(*shape):
                return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

            inputs = (randn(batch, seqlen, heads, config["head_dim"]), randn(batch, seqlen, groups, config["head_dim"]),
                      randn(batch, seqlen, groups, config["head_dim"]),
                      randn(batch, seqlen, groups, config["index_head_dim"]),
                      randn(batch, seqlen, 1, config["index_head_dim"]))
            q, k, v, index_q, index_k = inputs

            def run_msa():
                block_indices = msa.select_blocks(index_q, index_k, block_size=block_size, topk=topk)
                return block_indices, msa.sparse_attention(q, k, v, block_indices, block_size=block_size)

            with torch.no_grad():
                progress.update(task, description=f"S={seqlen}: dense")
                dense_ms = median_ms(lambda: msa.dense_attention(q, k, v), device, repeats=args.repeats)
                progress.update(task, description=f"S={seqlen}: MSA")
                msa_ms = median_ms(run_msa, device, repeats=args.repeats)
                block_indices, out = run_msa()
                row = {"seqlen": seqlen, "dense_ms": dense_ms, "msa_ms": msa_ms, "speedup": dense_ms / msa_ms,
                       "attended_fraction": attended_fraction(block_indices, block_size)}
                if seqlen <= args.check_max_seqlen:
                    progress.update(task, description=f"S={seqlen}: float64 reference check")
                    row.update(_check(inputs, block_indices, out, block_size))
            rows.append(row)
            progress.advance(task)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    path = msa_path(config)
    table = Table(title=f"MSA vs dense causal attention, forward ({device_name}, {config['dtype']}, B={batch}, "
                        f"Hq={heads}, G={groups}, D={config['head_dim']}, Di={config['index_head_dim']}, "
                        f"block={block_size}, topk={topk})", caption=f"MSA ran the {path}")
    for column in ("seq len", "dense ms", "MSA ms", "speed-up", "keys attended", "rel err vs fp64", "same selection"):
        table.add_column(column, justify="right")
    for row in rows:
        checked = "rel_err" in row
        table.add_row(str(row["seqlen"]), f"{row['dense_ms']:.2f}", f"{row['msa_ms']:.2f}", f"{row['speedup']:.2f}x",
                      f"{100 * row['attended_fraction']:.1f}%", f"{row['rel_err']:.1e}" if checked else "-",
                      f"{100 * row['selection_match']:.1f}%" if checked else "-")
    console.print(table)
    if args.json is not None:
        record = {"benchmark": "msa bench", "device": device_name, "torch": torch.__version__,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "commit": git_commit(), "msa_path": path, "config": {**config, "device": str(device)}, "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2))
        console.print(f"wrote {args.json}")
    return 0
