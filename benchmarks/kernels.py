"""GPU benchmark of the MSA kernels on the paper's layer against dense attention through SDPA.

For each sequence length: prefill forward (indexer + sparse attention) and a
training step (forward + backward of the sparse attention, plus the KL loss),
against cuDNN attention and FlashAttention-2 through
``torch.nn.functional.scaled_dot_product_attention`` in the same run; the time
and achieved TFLOP/s of each kernel against the bf16 matrix ceiling measured
in the same run (the FP8 indexer against the FP8 one). Prefill runs twice:
with the default bf16 index ranking and with FP8 index vectors
(``index_dtype=torch.float8_e4m3fn``, quantisation included), with the share
of the bf16 selection that the FP8 one keeps. With ``--deterministic`` the
training step and the backward kernels are also timed in their deterministic
variants (``deterministic=True``: no float32 atomics, bitwise reproducible
gradients), beside the default ones. Writes ``kernels.json`` under ``--out``.

    PYTHONPATH=src python benchmarks/kernels.py --out benchmarks/results/<run>
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from rich.console import Console
from rich.progress import Progress
from torch.nn.attention import SDPBackend, sdpa_kernel

import msa
from msa import kernels
from msa.cli.bench import attended_fraction, git_commit
from msa.cli.timing import median_ms
from msa.fp8 import FP8_DTYPE, quantize_rows
from msa.varlen import token_positions

from flops import PAPER_LAYER, kernel_flops  # noqa: E402  (benchmarks/ is the script's directory)



def time_ms(fn, warmup: int, repeats: int) -> float:
    return median_ms(fn, torch.device("cuda"), warmup=warmup, repeats=repeats)


def matmul_ceiling_tflops() -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / time_ms(lambda: a @ b, 3, 20) / 1e9


def fp8_matmul_ceiling_tflops() -> float | None:
    """FP8 (e4m3) x FP8 -> bf16 through ``torch._scaled_mm``; None where this GPU or build lacks it."""
    a, b = (torch.randn(8192, 8192, device="cuda").to(FP8_DTYPE) for _ in range(2))
    one = torch.ones((), device="cuda")
    try:
        return 2 * 8192**3 / time_ms(lambda: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16), 3,
                                     20) / 1e9
    except (RuntimeError, AttributeError):
        return None


def ranking_inputs(index_q: torch.Tensor, index_k: torch.Tensor) -> dict:
    """``select_blocks``' inputs and keyword arguments for bf16 and for FP8 index vectors (:mod:`msa.fp8`)."""
    (fp8_q, _), (fp8_k, fp8_k_scale) = quantize_rows(index_q), quantize_rows(index_k[:, 0])
    return {"bf16": ((index_q, index_k), {}), "fp8": ((fp8_q, fp8_k), dict(index_k_scale=fp8_k_scale))}


def tune_indexer(c: dict, seqlen: int, console) -> dict:
    """Time the indexer's configurations on the layer, bf16 and FP8 index vectors; returns ms per config."""
    index_q = torch.randn(seqlen, c["groups"], c["index_dim"], device="cuda", dtype=torch.bfloat16)
    index_k = torch.randn(seqlen, 1, c["index_dim"], device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device="cuda")
    results = {}
    for dtype, (inputs, scales) in ranking_inputs(index_q, index_k).items():
        for config in [(64, 4, 3, 128), (128, 8, 3, 128), (256, 8, 3, 128), (256, 8, 4, 128), (256, 8, 2, 128),
                       (64, 4, 3, 256), (128, 8, 3, 256), (128, 8, 2, 256), (128, 4, 3, 256), (64, 8, 3, 256)]:
            name = f"{dtype} {config}"
            try:
                results[name] = time_ms(lambda: kernels.select_blocks(
                    *inputs, cu, seqlen, c["block_size"], c["topk"], kernels.IndexerConfig(*config), **scales), 2, 5)
            except Exception as error:  # e.g. out of shared memory or registers
                results[name] = str(error).splitlines()[0][:100]
        best = min((v, k) for k, v in results.items() if isinstance(v, float) and k.startswith(dtype))
        console.print(f"indexer configs at S={seqlen}: best {best[1]} {best[0]:.2f} ms (defaults "
                      f"{kernels.indexer_config(fp8=False)}, FP8 {kernels.indexer_config(fp8=True)})")
    return results


def packed_attention_inputs(c: dict, seqlen: int, seed: int, device: str = "cuda"):
    """Random bf16 ``q``, ``k``, ``v`` of one packed sequence, its ``cu_seqlens`` and token starts, and
    ``select_blocks``' selection on random index vectors; with ``randn``, which draws further inputs from the
    same seeded stream."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16)

    q, k, v = randn(seqlen, c["heads"], c["head_dim"]), randn(seqlen, c["groups"], c["head_dim"]), \
        randn(seqlen, c["groups"], c["head_dim"])
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device=device)
    starts = token_positions(cu, seqlen)[0].int()
    blocks = kernels.select_blocks(randn(seqlen, c["groups"], c["index_dim"]), randn(seqlen, 1, c["index_dim"]), cu,
                                   seqlen, c["block_size"], c["topk"])
    return q, k, v, cu, starts, blocks, randn


def tune_kv_outer(c: dict, seqlen: int, console) -> dict:
    """Time the KV-outer attention and KL kernels per (rows, warps, stages); returns ms per config."""
    q, k, v, cu, starts, blocks, randn = packed_attention_inputs(c, seqlen, seed=1)
    bs, scale = c["block_size"], c["head_dim"] ** -0.5
    dout = torch.randn_like(q)
    results = {}
    for rows in (32, 64):
        for warps in (4, 8):
            for stages in (1, 2, 3):
                config = (rows, warps, stages)
                tile = kernels.KVOuterConfig(*config)
                forward = functools.partial(kernels.sparse_attention_fwd, q, k, v, blocks, starts, cu, seqlen, bs,
                                            scale, schedule="kv", config=kernels.SparseForwardConfig(tile=tile))
                try:
                    out, lse = forward()
                    backward = functools.partial(kernels.sparse_attention_bwd, q, k, v, out, lse, dout, blocks, starts,
                                                 cu, seqlen, bs, scale, config=kernels.SparseBackwardConfig(tile=tile))
                    results[str(config)] = {"fwd": time_ms(forward, 2, 5), "bwd": time_ms(backward, 2, 5)}
                except Exception as error:  # e.g. out of shared memory or registers
                    results[str(config)] = str(error).splitlines()[0][:100]
    index_q, index_k = randn(seqlen, c["groups"], c["index_dim"]), randn(seqlen, 1, c["index_dim"])
    out, lse = kernels.sparse_attention_fwd(q, k, v, blocks, starts, cu, seqlen, bs, scale)
    grad_scale = torch.ones(1, device="cuda")
    index_scale = c["index_dim"] ** -0.5
    _, index_lse, teacher_lse = kernels.index_kl_fwd(q, k, index_q, index_k, blocks, cu, seqlen, bs, scale,
                                                     index_scale, lse)
    kl_runs = {  # by the IndexKLConfig field each one's kernel launches with
        "forward": lambda kl: kernels.index_kl_fwd(q, k, index_q, index_k, blocks, cu, seqlen, bs, scale, index_scale,
                                                   lse, config=kl),
        "backward": lambda kl: kernels.index_kl_bwd(q, k, index_q, index_k, blocks, starts, cu, seqlen, teacher_lse,
                                                    index_lse, grad_scale, bs, scale, index_scale, config=kl),
        "fused": lambda kl: kernels.index_kl_fwd_bwd(q, k, index_q, index_k, blocks, cu, seqlen, bs, scale,
                                                     index_scale, lse, config=kl),  # includes the student pass
    }
    for field, run in kl_runs.items():  # one launch varied at a time, the others at their defaults
        for config in [(rows, warps, stages) for rows in (32, 64, 128) for warps in (4, 8) for stages in (1, 2)]:
            kl = dataclasses.replace(kernels.IndexKLConfig(), **{field: kernels.KVOuterConfig(*config)})
            name = f"KL {field} {config}"
            try:
                run(kl)
                results[name] = time_ms(lambda: run(kl), 2, 5)
            except Exception as error:  # e.g. out of shared memory or registers
                results[name] = str(error).splitlines()[0][:100]
    console.print(f"KV-outer configs at S={seqlen}: {json.dumps(results)}")
    return results


def dense_runner(backend, q, k, v):
    """SDPA on ``[B, S, H, D]`` with one backend; GQA through enable_gqa."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def run():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

    return run


def parse_layer(text: str) -> dict:
    """``PAPER_LAYER`` with ``name=value`` overrides, comma-separated (e.g. ``heads=8,head_dim=64``)."""
    layer = dict(PAPER_LAYER)
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in PAPER_LAYER or not value.isdigit():
            raise ValueError(f"--layer: expected name=integer with name in {sorted(PAPER_LAYER)}, got {item!r}")
        layer[name] = int(value)
    return layer


def bench_seqlen(c: dict, seqlen: int, warmup: int, repeats: int, with_fa2: bool, train: bool, progress,
                 task, deterministic: bool = False) -> dict:
    """One length's row; with ``deterministic`` (and ``train``) the deterministic backward kernels
    (``*_deterministic``) and training step (``msa_train_deterministic_ms``) too."""
    gen = torch.Generator(device="cuda").manual_seed(seqlen)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)

    q, k, v = randn(1, seqlen, c["heads"], c["head_dim"]), *(randn(1, seqlen, c["groups"], c["head_dim"]) for _ in "kv")
    index_q, index_k = randn(1, seqlen, c["groups"], c["index_dim"]), randn(1, seqlen, 1, c["index_dim"])
    row = {"seqlen": seqlen}
    scale, index_scale = c["head_dim"] ** -0.5, c["index_dim"] ** -0.5

    # --- per-kernel timings on packed tensors (what the ops launch)
    progress.update(task, description=f"S={seqlen}: MSA kernels")
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device="cuda")
    starts = token_positions(cu, seqlen)[0].int()
    pq, pk, pv, piq, pik = (x[0].contiguous() for x in (q, k, v, index_q, index_k))
    blocks = kernels.select_blocks(piq, pik, cu, seqlen, c["block_size"], c["topk"])
    bs = c["block_size"]
    out, lse = kernels.sparse_attention_fwd(pq, pk, pv, blocks, starts, cu, seqlen, bs, scale)
    t = {}
    ranking = ranking_inputs(piq, pik)
    for dtype, (inputs, scales) in ranking.items():
        t["indexer" if dtype == "bf16" else "indexer_fp8"] = time_ms(lambda: kernels.select_blocks(
            *inputs, cu, seqlen, bs, c["topk"], **scales), warmup, repeats)
    fp8_inputs, fp8_scales = ranking["fp8"]
    fp8_blocks = kernels.select_blocks(*fp8_inputs, cu, seqlen, bs, c["topk"], **fp8_scales)
    # share of the bf16 selection's (token, group, block) entries that the FP8 selection keeps
    kept = (fp8_blocks.long()[..., :, None] == blocks.long()[..., None, :]).any(-2) & (blocks >= 0)
    row["fp8_selection_recall"] = (kept.sum() / (blocks >= 0).sum()).item()
    for schedule in ("query", "kv"):
        t[f"sparse_fwd_{schedule}"] = time_ms(lambda: kernels.sparse_attention_fwd(
            pq, pk, pv, blocks, starts, cu, seqlen, bs, scale, schedule=schedule), warmup, repeats)
    if train:
        dout = torch.randn_like(out)
        t["sparse_bwd"] = time_ms(lambda: kernels.sparse_attention_bwd(pq, pk, pv, out, lse, dout, blocks, starts, cu,
                                                                       seqlen, bs, scale), warmup, repeats)
        if deterministic:
            t["sparse_bwd_deterministic"] = time_ms(lambda: kernels.sparse_attention_bwd(
                pq, pk, pv, out, lse, dout, blocks, starts, cu, seqlen, bs, scale, deterministic=True), warmup, repeats)
    kl_rows, index_lse, teacher_lse = kernels.index_kl_fwd(pq, pk, piq, pik, blocks, cu, seqlen, bs, scale,
                                                           index_scale, lse)
    t["kl_fwd"] = time_ms(lambda: kernels.index_kl_fwd(pq, pk, piq, pik, blocks, cu, seqlen, bs, scale, index_scale,
                                                       lse), warmup, repeats)
    if train:
        grad_scale = torch.ones(1, device="cuda")
        t["kl_bwd"] = time_ms(lambda: kernels.index_kl_bwd(pq, pk, piq, pik, blocks, starts, cu, seqlen, teacher_lse,
                                                           index_lse, grad_scale, bs, scale, index_scale),
                              warmup, repeats)
        t["kl_fused"] = time_ms(lambda: kernels.index_kl_fwd_bwd(pq, pk, piq, pik, blocks, cu, seqlen, bs, scale,
                                                                 index_scale, lse), warmup, repeats)
        if deterministic:  # the deterministic training step runs kl_fwd then this instead of kl_fused
            t["kl_bwd_deterministic"] = time_ms(lambda: kernels.index_kl_bwd(
                pq, pk, piq, pik, blocks, starts, cu, seqlen, teacher_lse, index_lse, grad_scale, bs, scale,
                index_scale, deterministic=True), warmup, repeats)
    del out, kl_rows
    row["kernel_ms"] = t
    fraction = attended_fraction(blocks[None], c["block_size"])
    attended = fraction * seqlen * (seqlen + 1) / 2  # (query, key) pairs per group
    row["attended_fraction"] = fraction
    flops = kernel_flops(c, seqlen, attended)
    row["kernel_tflops"] = {name: flops[name] / t[name] / 1e9 for name in t}

    # --- public-op pipelines
    progress.update(task, description=f"S={seqlen}: MSA prefill / training step")

    def msa_prefill(index_dtype=None):
        selected = msa.select_blocks(index_q, index_k, block_size=c["block_size"], topk=c["topk"],
                                     index_dtype=index_dtype)
        return msa.sparse_attention(q, k, v, selected, block_size=c["block_size"])

    grad = torch.randn_like(q) if train else None
    q_, k_, v_, iq_, ik_ = (x.detach().requires_grad_() for x in (q, k, v, index_q, index_k))

    def msa_train(deterministic=None):
        selected = msa.select_blocks(iq_.detach(), ik_.detach(), block_size=c["block_size"], topk=c["topk"])
        o, main_lse = msa.sparse_attention(q_, k_, v_, selected, block_size=c["block_size"], return_lse=True,
                                           deterministic=deterministic)
        kl = msa.index_kl_loss(q_, k_, iq_, ik_, selected, block_size=c["block_size"], main_lse=main_lse,
                               deterministic=deterministic)
        torch.autograd.backward((o, kl), (grad, torch.ones((), device="cuda")))

    row["msa_prefill_ms"] = time_ms(msa_prefill, warmup, repeats)
    row["msa_prefill_fp8_ms"] = time_ms(lambda: msa_prefill(FP8_DTYPE), warmup, repeats)
    if train:
        row["msa_train_ms"] = time_ms(msa_train, warmup, repeats)
        if deterministic:
            row["msa_train_deterministic_ms"] = time_ms(lambda: msa_train(deterministic=True), warmup, repeats)
            row["deterministic_train_slowdown"] = row["msa_train_deterministic_ms"] / row["msa_train_ms"]

    # --- dense baselines (free what the MSA steps accumulated first)
    for x in (q_, k_, v_, iq_, ik_):
        x.grad = None
    torch.cuda.empty_cache()
    dense_fwd_flops = 4 * c["heads"] * c["head_dim"] * seqlen * (seqlen + 1) / 2
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION}
    if with_fa2:
        backends["fa2"] = SDPBackend.FLASH_ATTENTION
    for name, backend in backends.items():
        progress.update(task, description=f"S={seqlen}: dense {name}")
        fwd = dense_runner(backend, q, k, v)
        try:
            row[f"{name}_fwd_ms"] = time_ms(fwd, warmup, repeats)
            row[f"{name}_fwd_tflops"] = dense_fwd_flops / row[f"{name}_fwd_ms"] / 1e9
            row[f"prefill_speedup_vs_{name}"] = row[f"{name}_fwd_ms"] / row["msa_prefill_ms"]
            row[f"prefill_fp8_speedup_vs_{name}"] = row[f"{name}_fwd_ms"] / row["msa_prefill_fp8_ms"]
            if train:
                train_fwd = dense_runner(backend, q_, k_, v_)
                row[f"{name}_train_ms"] = time_ms(lambda: train_fwd().backward(grad.transpose(1, 2)), warmup,
                                                  repeats)
                row[f"train_speedup_vs_{name}"] = row[f"{name}_train_ms"] / row["msa_train_ms"]
        except RuntimeError as error:  # a backend that refuses the shape, or runs out of memory
            row[f"{name}_error"] = str(error).splitlines()[0]
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seqlens", default="8192,32768,131072")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tune", type=int, default=0, help="time kernel configurations at this length first")
    parser.add_argument("--tune-kernels", default="indexer,kv_outer",
                        help="which sweeps --tune runs: indexer (~1 min at 128K), kv_outer (attention and KL, ~4 min)")
    parser.add_argument("--train-max", type=int, default=524288,
                        help="longest length for backward kernels and training steps (memory)")
    parser.add_argument("--long", type=int, default=262144, help="from this length on: 1 warm-up, 2 repeats, no FA2")
    parser.add_argument("--layer", default="", help="overrides of the paper's layer, e.g. heads=8,head_dim=64")
    parser.add_argument("--deterministic", action="store_true",
                        help="also time the training step and backward kernels with deterministic=True")
    args = parser.parse_args()
    layer = parse_layer(args.layer)
    console = Console()
    device = torch.cuda.get_device_name()
    record = {"benchmark": "kernels", "device": device, "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(),
              "layer": layer, "dtype": "bfloat16", "batch": 1, "deterministic": args.deterministic}
    record["matmul_ceiling_tflops"] = matmul_ceiling_tflops()
    record["fp8_matmul_ceiling_tflops"] = fp8_matmul_ceiling_tflops()
    console.print(f"{device}: bf16 matmul ceiling {record['matmul_ceiling_tflops']:.0f} TFLOP/s, FP8 "
                  f"{record['fp8_matmul_ceiling_tflops'] or 0:.0f}")
    path = args.out / "kernels.json"
    args.out.mkdir(parents=True, exist_ok=True)
    sweeps = {"indexer": tune_indexer, "kv_outer": tune_kv_outer}
    for name in args.tune_kernels.split(",") if args.tune else []:
        if name not in sweeps:
            raise ValueError(f"--tune-kernels: {name!r} is not one of {sorted(sweeps)}")
        record[f"{name}_configs_ms"] = sweeps[name](layer, args.tune, console)
        path.write_text(json.dumps(record, indent=2))
    record["rows"] = rows = []
    seqlens = [int(s) for s in args.seqlens.split(",")]
    with Progress(console=console) as progress:
        task = progress.add_task("kernels", total=len(seqlens))
        for seqlen in seqlens:
            long = seqlen >= args.long
            row = bench_seqlen(layer, seqlen, 1 if long else 3, 2 if long else args.repeats, not long,
                               seqlen <= args.train_max, progress, task, args.deterministic)
            rows.append(row)
            console.print(json.dumps(row))
            path.write_text(json.dumps(record, indent=2))  # after every length: a cut-off run keeps its rows
            torch.cuda.empty_cache()
            progress.advance(task)


if __name__ == "__main__":
    main()
