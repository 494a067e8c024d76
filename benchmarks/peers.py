"""MSA's sparse attention against flash-linear-attention's NSA selected-attention kernel (issue #27, point 4).

Both kernels attend each (query, GQA group) to the same key blocks: one random
selection from ``msa.select_blocks`` per length (the inputs of ``kernels.py``'s
``bench_seqlen``, same seed), converted to fla's format by :func:`to_fla`. In
the same run, per length: the forward of ``msa.sparse_attention`` and of fla's
selected branch (``fla.ops.nsa.parallel.ParallelNSAFunction``, which
``parallel_nsa`` applies; without its compression and sliding-window branches
and their gates, which MSA does not have), then forward + backward of both
(gradients of q, k and v through ``torch.autograd.grad``). Each timing takes the
selection as a plain tensor, so each call derives what its kernels need (MSA's
checks and offsets, fla's CSR inversion for its dk/dv pass). fla's output and
gradients are checked against MSA's on the same inputs (relative L2 error in
the JSON); the run stops if one is above ``BF16_BOUND``. Writes ``peers.json``
under ``--out``.

fla is not a dependency of msa: carry its wheel in ``.whl/`` (see
benchmarks/README.md) and install it with ``python -m pip install --no-index
--no-deps .whl/*.whl``.

    PYTHONPATH=src python benchmarks/peers.py --out benchmarks/results/<run>
"""

from __future__ import annotations

import argparse
import datetime
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from rich.console import Console
from rich.progress import Progress

import msa
from msa.cli.bench import attended_fraction, git_commit

from kernels import parse_layer, time_ms  # noqa: E402  (benchmarks/ is the script's directory)

FLA_WHEEL = "fla_core-0.6.0-py3-none-any.whl"
INSTALL = ("flash-linear-attention is not installed. It travels as wheels in .whl/ at the repository root "
           "(made with: python -m pip download --no-deps fla-core==0.6.0 einops -d .whl); install them with\n"
           "    python -m pip install --no-index --no-deps .whl/*.whl\n"
           "or, without pip, unpack them onto PYTHONPATH (benchmarks/README.md, Peers). fla-core is pure Python + "
           "Triton; its only other requirement is einops.")
# Relative L2 error above which fla's output or gradients do not compute what MSA computes: two bf16 kernels
# differ by a few bf16 roundings (~1e-3 to 5e-3); a wrong block or mask gives errors of order 1e-1.
BF16_BOUND = 2e-2


def import_fla():
    """``(fla module, ParallelNSAFunction.apply, parallel_nsa)``; exits with how to install it from ``.whl/``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fla warns about flash-attn (its window branch), unused here
            import fla
            from fla.ops.nsa.parallel import ParallelNSAFunction, parallel_nsa
    except ImportError as error:
        raise SystemExit(f"{INSTALL}\n({error})") from error
    return fla, ParallelNSAFunction.apply, parallel_nsa


def fla_limits(layer: dict) -> list[str]:
    """What in ``layer`` fla's selected-attention kernel does not take (empty when it takes it all)."""
    group = layer["heads"] // layer["groups"]
    problems = []
    if layer["heads"] % layer["groups"] or group < 16 or group & (group - 1):
        problems.append(f"query heads per KV head {layer['heads']}/{layer['groups']}: fla needs a power of two "
                        ">= 16 (the kernel's [G, block] products)")
    if layer["head_dim"] > 256:
        problems.append(f"head_dim {layer['head_dim']}: fla's forward takes at most 256")
    if layer["block_size"] < 16 or layer["block_size"] & (layer["block_size"] - 1):
        problems.append(f"block_size {layer['block_size']}: fla needs a power of two >= 16")
    return problems


def to_fla(block_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MSA's selection (README "Selection contract") as fla's ``(block_indices, block_counts)``.

    fla's ``block_indices`` is ``[B, T, H_kv, S]``: the same layout as MSA's ``[B, S, G, topk]`` (KV head ``h``
    serves query heads ``h * G .. h * G + G - 1`` in both), block ids from the sequence start, any order
    (the order only changes the accumulation order). fla ignores slot ``s >= block_counts[b, t, h]`` and, in
    every kernel, any negative id, and masks keys after the query inside a block (the local block's causal
    mask); its backward's CSR inversion needs ``S`` a power of two, so MSA's ``-1`` padding is extended to the
    next one. ``block_counts`` (int32 ``[B, T, H_kv]``) counts the valid entries, which come first in MSA's
    contract (checked here)."""
    topk = block_indices.shape[-1]
    valid = block_indices >= 0
    counts = valid.sum(-1, dtype=torch.int32)
    if not torch.equal(valid, torch.arange(topk, device=valid.device) < counts[..., None]):
        raise ValueError("block_indices: valid entries must come first (README, Selection contract)")
    padded = F.pad(block_indices.to(torch.int32), (0, triton.next_power_of_2(topk) - topk), value=-1)
    return padded.contiguous(), counts.contiguous()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_seqlen(c: dict, seqlen: int, warmup: int, repeats: int, fla_fn, parallel_nsa, progress, task,
                 device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> dict:
    """One length's row: the check, then (if it passed) the four timings. ``device`` and ``dtype`` other than
    CUDA and bf16 serve a dry run of this function (e.g. on CPU under ``TRITON_INTERPRET=1``) only."""
    gen = torch.Generator(device=device).manual_seed(seqlen)  # kernels.py's inputs at this length

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    q, k, v = randn(1, seqlen, c["heads"], c["head_dim"]), *(randn(1, seqlen, c["groups"], c["head_dim"]) for _ in "kv")
    index_q, index_k = randn(1, seqlen, c["groups"], c["index_dim"]), randn(1, seqlen, 1, c["index_dim"])
    bs, scale = c["block_size"], c["head_dim"] ** -0.5
    progress.update(task, description=f"S={seqlen}: selection")
    blocks = msa.select_blocks(index_q, index_k, block_size=bs, topk=c["topk"])
    del index_q, index_k
    fla_blocks, fla_counts = to_fla(blocks)
    row = {"seqlen": seqlen, "attended_fraction": attended_fraction(blocks, bs)}

    def msa_fwd(q, k, v):
        return msa.sparse_attention(q, k, v, blocks, block_size=bs, softmax_scale=scale)

    def fla_fwd(q, k, v):
        return fla_fn(q, k, v, fla_blocks, fla_counts, bs, scale, None)

    dout = torch.randn_like(q)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def train(fwd):
        return lambda: torch.autograd.grad(fwd(*leaves), leaves, dout)

    # --- fla against MSA on the same inputs, before any timing
    progress.update(task, description=f"S={seqlen}: check fla against MSA")
    with torch.no_grad():
        out = msa_fwd(q, k, v)
        row["rel_err_out"] = rel_err(fla_fwd(q, k, v), out)
        # the public entry point, selected branch only (it also mean-pools K and V, unused without g_cmp)
        row["rel_err_out_parallel_nsa"] = rel_err(
            parallel_nsa(q, k, v, block_indices=fla_blocks, block_counts=fla_counts, block_size=bs, scale=scale), out)
    del out
    grads = train(msa_fwd)()
    for name, ours, theirs in zip(("dq", "dk", "dv"), grads, train(fla_fwd)()):
        row[f"rel_err_{name}"] = rel_err(theirs, ours)
    del grads
    torch.cuda.empty_cache()
    errors = {name: value for name, value in row.items() if name.startswith("rel_err_")}
    row["check_passed"] = all(value <= BF16_BOUND for value in errors.values())  # NaN fails too
    if not row["check_passed"]:
        return row

    # --- timings, in the same process
    with torch.no_grad():
        for name, fwd in (("msa", msa_fwd), ("fla", fla_fwd)):
            progress.update(task, description=f"S={seqlen}: {name} forward")
            row[f"{name}_fwd_ms"] = time_ms(lambda: fwd(q, k, v), warmup, repeats)
    for name, fwd in (("msa", msa_fwd), ("fla", fla_fwd)):
        progress.update(task, description=f"S={seqlen}: {name} forward + backward")
        row[f"{name}_train_ms"] = time_ms(train(fwd), warmup, repeats)
        torch.cuda.empty_cache()
    row["fwd_ratio_fla_over_msa"] = row["fla_fwd_ms"] / row["msa_fwd_ms"]
    row["train_ratio_fla_over_msa"] = row["fla_train_ms"] / row["msa_train_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seqlens", default="32768,131072")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (fla autotunes on its first calls)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--layer", default="", help="overrides of the paper's layer, e.g. head_dim=64,block_size=64")
    args = parser.parse_args()
    console = Console()
    if not torch.cuda.is_available():
        raise SystemExit("peers.py times CUDA kernels: run it on a GPU machine")
    fla, fla_fn, parallel_nsa = import_fla()
    layer = parse_layer(args.layer)
    if problems := fla_limits(layer):
        raise SystemExit("fla's NSA kernel does not take this layer: " + "; ".join(problems)
                         + ". Pick a shape both take with --layer.")
    device = torch.cuda.get_device_name()
    record = {"benchmark": "peers", "device": device, "torch": torch.__version__, "triton": triton.__version__,
              "fla": getattr(fla, "__version__", None),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "layer": layer, "dtype": "bfloat16", "batch": 1,
              "msa_entry": "msa.sparse_attention(q, k, v, block_indices, block_size=...)",
              "fla_entry": "fla.ops.nsa.parallel.ParallelNSAFunction.apply (parallel_nsa's selected branch; "
                           "no compression or window branch, no gate)",
              "selection": "msa.select_blocks on random bf16 index vectors (kernels.py's inputs, seed = seqlen), "
                           "-1 padded to a power of two, block_counts = valid entries",
              "check_bound_rel_l2": BF16_BOUND, "warmup": args.warmup, "repeats": args.repeats}
    console.print(f"{device}: torch {torch.__version__}, triton {triton.__version__}, fla {record['fla']}, "
                  f"layer {layer}")
    path = args.out / "peers.json"
    args.out.mkdir(parents=True, exist_ok=True)
    record["rows"] = rows = []
    seqlens = [int(s) for s in args.seqlens.split(",")]
    with Progress(console=console) as progress:
        task = progress.add_task("peers", total=len(seqlens))
        for seqlen in seqlens:
            row = bench_seqlen(layer, seqlen, args.warmup, args.repeats, fla_fn, parallel_nsa, progress, task)
            rows.append(row)
            console.print(json.dumps(row))
            path.write_text(json.dumps(record, indent=2))  # after every length: a cut-off run keeps its rows
            if not row["check_passed"]:
                errors = {name: value for name, value in row.items() if name.startswith("rel_err_")}
                raise SystemExit(f"S={seqlen}: fla's result differs from MSA's beyond the bf16 bound {BF16_BOUND} "
                                 f"(relative L2 errors {errors}); no timing taken. Row written to {path}.")
            torch.cuda.empty_cache()
            progress.advance(task)


if __name__ == "__main__":
    main()
