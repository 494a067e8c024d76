"""``msa generate``: prefill a long prompt into the paged KV cache, decode greedily, and check the logits.

Builds a small :class:`msa.nn.MSATransformer` (random weights, seeded), runs
:class:`msa.inference.Generator` (chunked prefill, one-token decode steps,
CUDA graphs on a GPU), then recomputes the whole sequence in one pass through
``msa.select_blocks`` / ``msa.sparse_attention`` and reports how far the
cached logits are from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from msa.cli.bench import DTYPES
from msa.fp8 import FP8_NAME
from msa.inference.generate import Generator
from msa.nn import MSAConfig, MSATransformer

CPU_DEFAULTS = dict(prompt_len=2000, chunk_size=512, dtype="float32",
                    model=MSAConfig(vocab_size=512, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2,
                                    head_dim=32, intermediate_size=512, index_head_dim=32, block_size=64, topk=4))
GPU_DEFAULTS = dict(prompt_len=32768, chunk_size=8192, dtype="bfloat16",
                    model=MSAConfig(vocab_size=32000, hidden_size=1024, num_layers=4, num_heads=16, num_kv_heads=4,
                                    head_dim=64, intermediate_size=2816, index_head_dim=64, block_size=128, topk=16))


def add_parser(commands) -> None:
    parser = commands.add_parser("generate", help="prefill + decode with the paged KV cache, checked against a recompute",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=None, help="prefill chunk (tokens)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="decode without CUDA graphs")
    parser.add_argument("--fp8-index", action="store_true",
                        help="rank blocks with FP8 index vectors and keep the cache's index keys in FP8 (msa.fp8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.set_defaults(run=run)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    dtype = DTYPES[args.dtype or defaults["dtype"]]
    prompt_len, chunk_size = args.prompt_len or defaults["prompt_len"], args.chunk_size or defaults["chunk_size"]
    config = dataclasses.replace(defaults["model"], index_dtype=FP8_NAME if args.fp8_index else None)
    torch.manual_seed(args.seed)
    model = MSATransformer(config).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, config.vocab_size, (prompt_len,)).tolist()
    console = Console()

    generator = Generator(model, max_seq_len=prompt_len + args.new_tokens, chunk_size=chunk_size,
                          cuda_graphs=False if args.no_cuda_graphs else None)
    with console.status(f"prefill {prompt_len} tokens + decode {args.new_tokens}"):
        warm_up = generator.add_request()  # compiles the kernels outside the timings
        generator.prefill(warm_up, prompt[:chunk_size])
        generator.free(warm_up)
        request = generator.add_request()
        _synchronize(device)
        start = time.perf_counter()
        logits = [generator.prefill(request, prompt)]
        _synchronize(device)
        prefill_s = time.perf_counter() - start
        tokens = [int(logits[0].argmax())]
        decode_times = []
        while len(tokens) < args.new_tokens:
            start = time.perf_counter()
            logits.append(generator.step([request], [[tokens[-1]]])[-1])
            tokens.append(int(logits[-1].argmax()))  # reads the logits: waits for the step
            decode_times.append(time.perf_counter() - start)
        generator.free(request)
        logits = torch.stack(logits).float()

    with console.status("recompute the whole sequence in one pass"), torch.no_grad():
        full = torch.tensor(prompt + tokens[:-1], device=device)[None]
        reference = model(full, compute_kl_loss=False)[0][0, prompt_len - 1:].float()
    rel_err = ((logits - reference).norm() / reference.norm()).item()
    same_argmax = (logits.argmax(-1) == reference.argmax(-1)).double().mean().item()
    # steady-state decode: skip the first steps (kernel compilation, graph capture)
    steady = sorted(decode_times[2:] or decode_times or [float("nan")])
    decode_ms = 1e3 * steady[len(steady) // 2]

    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).removeprefix("torch."), "model": config.to_dict(), "prompt_len": prompt_len,
              "new_tokens": args.new_tokens, "chunk_size": chunk_size, "cuda_graphs": generator.cuda_graphs,
              "prefill_s": prefill_s, "decode_ms_per_token": decode_ms, "logits_rel_err": rel_err,
              "same_argmax": same_argmax, "tokens": tokens}
    index = ", FP8 index" if args.fp8_index else ""
    table = Table(title=f"msa generate ({result['device']}, {result['dtype']}{index}, {config.num_layers} layers, "
                        f"block {config.block_size} x topk {config.topk})")
    for column in ("prompt", "prefill s", "decode ms/token", "logits rel err vs recompute", "same argmax"):
        table.add_column(column, justify="right")
    table.add_row(str(prompt_len), f"{prefill_s:.2f}", f"{decode_ms:.2f}", f"{rel_err:.1e}", f"{100 * same_argmax:.0f}%")
    console.print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    if rel_err > tolerance:
        console.print(f"[red]cached logits differ from the recompute: {rel_err:.1e} > {tolerance:.0e}[/red]")
        return 1
    return 0
