"""A training step of a whole model: SmolLM2-135M's shape converted to MSA against the same model dense.

The model has SmolLM2-135M's shape (Llama: 30 layers, hidden 576, 9 query /
3 KV heads of dim 64, vocab 49,152), random weights (seeded), float32
parameters under bf16 autocast, batch one sequence; the MSA model is a copy
converted by ``msa.integrations.hf.convert`` (64 x 8, KL support 32 blocks by
default: the SmolLM2 study's settings) in sparse mode. One step is what
``msa train`` runs per update (``msa.training.Trainer``): forward (logits and,
for MSA, the KL loss), ``lm_loss + kl``, backward, gradient clipping per
parameter group, AdamW. Dense runs SDPA (cuDNN / FlashAttention through
transformers' default attention). Timed as whole steps (host clock after a
device synchronisation; ``--warmup`` untimed steps first), median of
``--repeats``, with the host's part of a step (``enqueue_ms``) and the
allocator's cudaMalloc/cudaFree calls per step. With ``--cuda-graph`` both
arms' steps are captured once as CUDA graphs and replayed (the host's launch
work gone: what the device alone needs; the graphed dense arm measured slower
than eager dense, so compare a graphed MSA step with the eager dense one: see
benchmarks/results/2026-12-06-h100-105-model-step-graphs-and-tuning-at-9355ac8). With ``--profile``, a
``torch.profiler`` trace of a few steps per arm at the first length: the top
operators by device and by host time, a Chrome trace of those steps, the device's busy time
per step and the host's synchronisations, and a ``cProfile`` listing of the host's Python functions over as many
more steps (``profile_<arm>_<len>*``). Writes
``model_step.json``.

    PYTHONPATH=src python benchmarks/model_step.py --out benchmarks/results/<run> [--profile]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import datetime
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

# run as a script, benchmarks/ is sys.path[0]: its kernels.py would shadow the `kernels` package transformers probes
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
import transformers  # noqa: E402
from rich.console import Console
from rich.progress import track
from rich.table import Table
from torch import nn

from msa.cli.bench import git_commit
from msa.integrations import hf
from msa.training.recipe import ModelApi, lm_loss

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True)
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync")


class Step:
    """One update of ``model`` as ``msa.training.Trainer`` makes it (AdamW per group, clipping per group)."""

    def __init__(self, model: nn.Module, kl_weight: float = 1.0, grad_clip: float = 1.0, capturable: bool = False):
        self.model, self.api, self.kl_weight, self.grad_clip = model, ModelApi(model), kl_weight, grad_clip
        index_ids = {id(p) for p in self.api.index_parameters}
        self.groups = [[p for p in model.parameters() if id(p) not in index_ids]]
        if self.api.index_parameters:
            self.groups.append(self.api.index_parameters)
        # capturable: AdamW keeps its step counts on the device, and autocast caches no casts (CUDA graphs)
        self.capturable = capturable
        self.optimizer = torch.optim.AdamW([dict(params=group) for group in self.groups], lr=1e-5,
                                           betas=(0.9, 0.95), capturable=capturable)

    def __call__(self, batch: torch.Tensor) -> None:
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=batch.device.type == "cuda",
                            cache_enabled=not self.capturable):
            logits, kl = self.api(batch)
        loss = lm_loss(logits, batch) + (self.kl_weight * kl if kl is not None else 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in self.groups:
            nn.utils.clip_grad_norm_([p for p in group if p.grad is not None], self.grad_clip)
        self.optimizer.step()


class GraphedStep:
    """A capturable :class:`Step` recorded once as a CUDA graph (forward, KL loss, backward, clipping, AdamW) after
    warm-up steps on a side stream, then replayed on each batch copied into its static input: the host's part of a
    step becomes one graph launch, as in PyTorch's whole-network capture."""

    def __init__(self, step: Step, batch: torch.Tensor, warmup: int = 3):
        self.batch = batch.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # Triton compilation, the optimizer's state, the gradients' buffers
                step(self.batch)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step(self.batch)

    def __call__(self, batch: torch.Tensor) -> None:
        self.batch.copy_(batch)
        self.graph.replay()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def allocator_calls(device: torch.device) -> int:
    """cudaMalloc + cudaFree calls of the caching allocator so far (each cudaFree synchronises the device)."""
    if device.type != "cuda":
        return 0
    stats = torch.cuda.memory_stats(device)
    return stats.get("num_device_alloc", 0) + stats.get("num_device_free", 0)


def time_steps(step: Step, batch: torch.Tensor, warmup: int, repeats: int) -> dict:
    """Median milliseconds of one step (``step_ms``, host clock after a device synchronisation), of the host's part
    of it (``enqueue_ms``: until ``step`` returns, the device idle at the start; close to ``step_ms`` when the host
    bounds the step or waits on the device inside it, far below it when the device does), and the allocator's
    cudaMalloc/cudaFree calls per timed step."""
    for _ in range(warmup):
        step(batch)
    steps, enqueues = [], []
    allocations = allocator_calls(batch.device)
    for _ in range(repeats):
        synchronize(batch.device)
        start = time.perf_counter()
        step(batch)
        enqueued = time.perf_counter()
        synchronize(batch.device)
        steps.append(time.perf_counter() - start)
        enqueues.append(enqueued - start)
    return dict(step_ms=1e3 * statistics.median(steps), enqueue_ms=1e3 * statistics.median(enqueues),
                allocator_calls_per_step=(allocator_calls(batch.device) - allocations) / repeats)


def profile(step: Step, batch: torch.Tensor, steps: int, out: Path, name: str) -> dict:
    """Over ``steps`` steps: the top operators by device time (``<name>.txt``) and by host time
    (``<name>_host.txt``), a Chrome trace of the steps (``<name>.json.gz``), the device's busy time per step
    (the sum of its kernels' time; against ``step_ms`` it shows how long the device idles), and the host's
    synchronising calls per step; then, over ``steps`` more, the host's Python functions by their own time
    (``<name>_python.txt``, cProfile: the forward pass and the optimizer; on a GPU the backward's Python runs on
    autograd's device thread, which cProfile does not see, and appears as ``run_backward``)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if batch.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step(batch)
            synchronize(batch.device)
    python_profile = cProfile.Profile()
    python_profile.enable()
    for _ in range(steps):
        step(batch)
        synchronize(batch.device)
    python_profile.disable()
    listing = io.StringIO()
    pstats.Stats(python_profile, stream=listing).sort_stats("tottime").print_stats(60)
    (out / f"{name}_python.txt").write_text(f"{steps} steps, cProfile by own time\n" + listing.getvalue())
    prof.export_chrome_trace(str(out / f"{name}.json.gz"))
    averages = prof.key_averages()
    sort_by = "cuda_time_total" if batch.device.type == "cuda" else "cpu_time_total"
    (out / f"{name}.txt").write_text(f"{steps} steps\n" + averages.table(sort_by=sort_by, row_limit=40))
    (out / f"{name}_host.txt").write_text(f"{steps} steps\n" + averages.table(sort_by="self_cpu_time_total",
                                                                             row_limit=60))
    kernels = [event for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    return dict(device_busy_ms_per_step=sum(event.time_range.elapsed_us() for event in kernels) / 1e3 / steps,
                kernels_per_step=len(kernels) / steps,
                host_syncs_per_step={key: sum(event.count for event in averages if event.key == key) / steps
                                     for key in SYNC_EVENTS})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", default="8192,32768")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--kl-topk", type=int, default=32)
    parser.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"], help="fewer for a smoke run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time both arms' steps replayed from CUDA graphs (GraphedStep) instead of eagerly")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    seqlens = [int(s) for s in args.seqlens.split(",")]
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**(SMOLLM2_135M | dict(num_hidden_layers=args.layers)),
                                      max_position_embeddings=max(seqlens))
    dense = transformers.LlamaForCausalLM(config).to(device)
    sparse = hf.convert(copy.deepcopy(dense), block_size=args.block_size, topk=args.topk, kl_topk=args.kl_topk)
    hf.set_mode(sparse, "sparse")
    if args.cuda_graph and device.type != "cuda":
        raise ValueError("--cuda-graph needs a CUDA device")
    arms = {"dense": Step(dense.train(), capturable=args.cuda_graph),
            "msa": Step(sparse.train(), capturable=args.cuda_graph)}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    record = dict(date=datetime.date.today().isoformat(), commit=git_commit(), device=device_name,
                  torch=torch.__version__, transformers=transformers.__version__,
                  config=vars(args) | dict(out=str(args.out)), rows=[])
    rows = record["rows"]
    for seqlen in track(seqlens, description="lengths"):
        batch = torch.randint(0, config.vocab_size, (1, seqlen), device=device,
                              generator=torch.Generator(device).manual_seed(seqlen))
        row = dict(seqlen=seqlen)
        for name, step in arms.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if args.cuda_graph:
                step = GraphedStep(step, batch)
            timing = time_steps(step, batch, args.warmup, args.repeats)
            row |= {f"{name}_{key}": value for key, value in timing.items()}
            row[f"{name}_tokens_per_s"] = seqlen / timing["step_ms"] * 1e3
            if device.type == "cuda":
                row[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if args.profile and seqlen == seqlens[0]:
                profiled = profile(step, batch, 3, args.out, f"profile_{name}_{seqlen}")
                row |= {f"{name}_{key}": value for key, value in profiled.items()}
            if args.cuda_graph:  # free the graph's memory pool and the gradients that live in it
                del step
                arms[name].model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
        row["msa_speedup"] = row["dense_step_ms"] / row["msa_step_ms"]
        rows.append(row)
        (args.out / "model_step.json").write_text(json.dumps(record, indent=1))  # a cut-off run keeps its lengths

    table = Table(title=f"training step, SmolLM2-135M shape ({args.layers} layers), MSA {args.block_size} x "
                        f"{args.topk} vs dense, {device}{', CUDA graphs' if args.cuda_graph else ''}")
    for column in ("length", "dense ms", "MSA ms", "MSA speed-up"):
        table.add_column(column, justify="right")
    for row in rows:
        length = f"{row['seqlen'] // 1024}K" if row["seqlen"] >= 1024 else str(row["seqlen"])
        table.add_row(length, f"{row['dense_step_ms']:.1f}", f"{row['msa_step_ms']:.1f}", f"{row['msa_speedup']:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
