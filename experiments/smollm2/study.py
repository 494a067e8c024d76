"""The SmolLM2-135M study's runs on one GPU (PROTOCOL.md, "Budget"): R0 once, then A, B, C per seed.

    python experiments/smollm2/study.py RUN --seed S --data DATA --base GGUF --work /tmp/smollm2 --out RESULTS

``DATA`` is the unpacked ``data/study`` folder (prepare_data.py), ``GGUF`` the
SmolLM2-135M-Instruct file. A run trains its arms with ``msa train`` under
``WORK`` (each arm's folder there; ``--resume`` continues one cut off) and
evaluates them; every arm it evaluates gets a new folder
``RESULTS/<date>_seed<S>_<arm>`` (``evaluate.run_dir``; never overwritten)
with ``config.json`` (provenance and settings), ``eval.json`` and, for
trained arms, ``train_log.jsonl`` (``msa train``'s log). ``--smoke`` runs the
same code with a few steps, windows and samples (the base may then be a
Hugging Face folder with a tokenizer, e.g. a tiny random Llama): a check of
the pipeline on a CPU, not a result. ``E1 --kl-topk K`` is the exploratory
warm-up of README.md (outside PROTOCOL.md: give it an ``--out`` of its own,
e.g. ``results/exploratory``).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import transformers
from rich.console import Console
from rich.progress import Progress

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import evaluate  # noqa: E402
import ruler  # noqa: E402

import msa  # noqa: E402
from msa.cli import main as msa_cli  # noqa: E402
from msa.cli.bench import git_commit  # noqa: E402
from msa.integrations import hf  # noqa: E402
from msa.training import load_model  # noqa: E402

console = Console()


@dataclass(frozen=True)
class Budget:
    """PROTOCOL.md's numbers (``--smoke`` shrinks them)."""

    seq_len: int = 8192
    warmup_steps: int = 240
    lm_steps: int = 384
    selector_subset: int = 8  # local and random selectors: the samples with id % 32 < 8
    oracle_subset: int = 2  # the oracle (dense attention of every layer): id % 32 < 2
    recall_windows: tuple[int, ...] = (0, 8, 16, 24)  # of each held-out domain
    agreement_windows: int = 2  # per domain, for the equivalence check's top-1 agreement
    heldout_windows: int = 32  # per domain


SMOKE = Budget(warmup_steps=2, lm_steps=2, selector_subset=1, oracle_subset=1, recall_windows=(0,),
               agreement_windows=1, heldout_windows=1)
PRIMARY, STRESS = (64, 8), (32, 8)
RECIPE = ["--lr", "3e-5", "--index-lr", "1e-3", "--kl-weight", "1.0", "--lr-warmup-steps", "20",
          "--min-lr-ratio", "0.1", "--weight-decay", "0", "--grad-clip", "1.0"]
KL_TOPK = 32
EQUIVALENCE_BLOCK = 128  # equiv: 128 x 64 blocks (the kernels take topk <= 64; PROTOCOL.md, Deviations 1)
EVALUATION_MINUTES = 3.5  # the longest evaluation of one arm (the full suite on an MSA model)


# ---------------------------------------------------------------------- training (msa train)

def train_arm(args, arm: str, init: Path, options: list[str]) -> Path:
    """Run (or finish) ``msa train`` for ``arm`` of the seed; returns its folder."""
    out = args.work / f"seed{args.seed}" / arm
    if (out / "model").exists():
        return out
    console.rule(f"seed {args.seed}: train {arm}")
    remaining = int(args.deadline - time.monotonic())
    if remaining < 60:
        raise SystemExit(f"too little time left to train {arm}: call run {args.run} again (it resumes)")
    tokens = {name: flat_tokens(args.data, name, args.work) for name in ("train", "warmup", "heldout_code")}
    code = msa_cli(["train", "--init", str(init), "--out", str(out), "--data", str(tokens["train"]),
                    "--warmup-data", str(tokens["warmup"]), "--val-data", str(tokens["heldout_code"]),
                    "--seq-len", str(args.budget.seq_len), "--batch-size", "1", "--seed", str(args.seed),
                    "--eval-every", "24", "--eval-batches", "2", "--checkpoint-every-s", "100000", *RECIPE,
                    *options, "--resume", "--max-seconds", str(remaining)])
    if code or not (out / "model").exists():
        raise SystemExit(f"{arm} stopped before its end: run {args.run} again (it resumes)")
    return out


def flat_tokens(data: Path, name: str, work: Path) -> Path:
    """``data/<name>.npy`` (windows ``[n, S]``) as the flat array ``msa train`` draws its windows from."""
    target = work / "tokens" / f"{name}.npy"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, np.load(data / f"{name}.npy").reshape(-1))
    return target


def warmup_options(args, shape) -> list[str]:
    block_size, topk = shape
    return ["--block-size", str(block_size), "--topk", str(topk), "--kl-topk", str(args.kl_topk), "--steps", "0",
            "--warmup-steps", str(args.budget.warmup_steps)]


def continuation_options(args) -> list[str]:
    return ["--warmup-steps", "0", "--steps", str(args.budget.lm_steps)]


# ---------------------------------------------------------------------- models under evaluation

def load_base(args):
    """The base model in float32 (GGUF dequantized), or a Hugging Face folder with ``--smoke``."""
    where = (dict(pretrained_model_name_or_path=args.base.parent, gguf_file=args.base.name) if args.base.is_file()
             else dict(pretrained_model_name_or_path=args.base))
    return transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).to(args.device).eval()


def load_trained(args, arm: str):
    """A trained arm in float32; an MSA one attends sparsely (whatever mode its run saved it in)."""
    model = load_model(args.work / f"seed{args.seed}" / arm / "model", device=args.device, dtype=torch.float32)[0]
    if hf.msa_layers(model):
        hf.set_mode(model, "sparse")
    return model.eval()


def logits_fn(model, autocast: bool):
    def run(ids, keep=0):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return model(ids, logits_to_keep=keep).logits

    return run


def selector(kind: str, shape, seed: int, layer: int):
    """The eval-only selections at the same key budget (PROTOCOL.md, "Index diagnostics")."""
    block_size, topk = shape
    generator = torch.Generator().manual_seed(seed * 1000 + layer)  # [seed, layer], one stream per layer

    def choose(q, k, index_q, index_k):
        seqlen, groups = k.shape[1], k.shape[2]
        if kind == "local":
            blocks = evaluate.local_blocks(seqlen, groups, block_size=block_size, topk=topk, device=q.device)
        elif kind == "random":
            blocks = evaluate.random_blocks(seqlen, groups, block_size=block_size, topk=topk, generator=generator,
                                            device=q.device)
        else:
            blocks = evaluate.oracle_blocks(q[0], k[0], block_size=block_size, topk=topk)
        return blocks[None]

    return choose


class Recorder:
    """An Index Branch selector that keeps what its layer read: ``q``, ``k`` and its own selection."""

    def __init__(self, shape):
        self.block_size, self.topk = shape
        self.last = None

    def __call__(self, q, k, index_q, index_k):
        block_indices = msa.select_blocks(index_q, index_k, block_size=self.block_size, topk=self.topk)
        self.last = (q[0], k[0], block_indices[0])
        return block_indices


# ---------------------------------------------------------------------- evaluation

class Evaluation:
    """The held-out windows and the suite, and how every model is measured on them."""

    def __init__(self, args):
        self.args, budget = args, args.budget
        held = {domain: np.load(args.data / f"heldout_{domain}.npy")[:budget.heldout_windows]
                for domain in ("code", "prose")}
        self.windows = np.concatenate([held["code"], held["prose"]])[:, :budget.seq_len]
        self.domains = [domain for domain in ("code", "prose") for _ in range(len(held[domain]))]
        self.recall_windows = np.concatenate([held["code"][list(budget.recall_windows)],
                                              held["prose"][list(budget.recall_windows)]])[:, :budget.seq_len]
        self.samples = ruler.load_suite(args.data)
        if args.smoke:
            self.samples = [s for s in self.samples if s.length == min(ruler.LENGTHS)][::60][:8]
        self.subset = [s for s in self.samples if s.id % 32 < budget.selector_subset]
        self.oracle_subset = [s for s in self.samples if s.id % 32 < budget.oracle_subset]
        self.autocast = args.device.type == "cuda"

    def loss(self, model) -> dict:
        nll = evaluate.window_nll(logits_fn(model, self.autocast), self.windows, device=self.args.device,
                                  progress=True)
        per_window = evaluate.bucket_means(nll)
        return dict(per_window_bucket=per_window, domains=self.domains, buckets=evaluate.BUCKET_NAMES,
                    summary=evaluate.loss_by_bucket(per_window, self.domains))

    def retrieval(self, model, samples, shape=None) -> dict:
        """Per-sample scores (teacher-forced; ``ruler.score_sample``); with an MSA ``shape``, also whether each
        sample's query position selected its needle's blocks, per layer and group, against chance."""
        recorders = self._record(model, shape) if shape else []
        run, results, needles = logits_fn(model, self.autocast), [], []
        with Progress(console=console) as progress:
            task = progress.add_task("retrieval", total=len(samples))
            for sample in samples:
                results.append(ruler.score_sample(run, sample, device=self.args.device))
                if recorders:
                    selection = torch.stack([r.last[2][sample.query_position] for r in recorders]).cpu()
                    hits = evaluate.needle_hits(selection, sample.query_position, sample.needle_span(),
                                                block_size=shape[0], topk=shape[1])
                    needles.append(dict(id=sample.id, task=sample.task, length=sample.length, depth=sample.depth,
                                        **{key: hits[key] for key in ("all", "any", "chance_all", "chance_any")},
                                        by_layer_all=np.asarray(hits["hits_all"]).mean(-1)))
                progress.advance(task)
        self._stop_recording(model)
        record = dict(samples=results, by_task=evaluate.retrieval_accuracy(results),
                      by_task_length=evaluate.retrieval_accuracy(results, by=("task", "length")))
        return record | (dict(needles=needles) if recorders else {})

    @staticmethod
    def _record(model, shape) -> list[Recorder]:
        recorders = [Recorder(shape) for _ in hf.msa_layers(model)]
        for branch, recorder in zip(hf.msa_layers(model), recorders):
            branch.selector = recorder
        return recorders

    @staticmethod
    def _stop_recording(model) -> None:
        for branch in hf.msa_layers(model):
            branch.selector = None

    @torch.no_grad()
    def recall(self, model, shape) -> dict:
        """Attention recall per layer, position and group on the recall windows; keys read per query."""
        block_size, topk = shape
        recorders = self._record(model, shape)
        run, recall, keys = logits_fn(model, self.autocast), [], []
        for window in self.recall_windows:
            run(torch.as_tensor(window, dtype=torch.long, device=self.args.device)[None], 1)
            layers = [recorder.last for recorder in recorders]
            recall.append(torch.stack([evaluate.attention_recall(q, k, blocks, block_size=block_size).cpu()
                                       for q, k, blocks in layers]))
            keys.append(np.mean([evaluate.keys_read(blocks, block_size=block_size).mean().item()
                                 for _, _, blocks in layers]))
        self._stop_recording(model)
        return dict(recall=evaluate.summarize_recall(torch.stack(recall), block_size=block_size, topk=topk),
                    keys_read_per_query=float(np.mean(keys)))

    @torch.no_grad()
    def agreement(self, model, reference) -> dict:
        """Top-1 agreement and the largest |logit difference| of ``model`` against ``reference``."""
        n = self.args.budget.agreement_windows
        ids = np.concatenate([self.windows[:n], self.windows[len(self.windows) // 2:][:n]])
        same, largest = [], 0.0
        for window in ids:
            tokens = torch.as_tensor(window, dtype=torch.long, device=self.args.device)[None]
            a, b = (logits_fn(m, self.autocast)(tokens).float() for m in (model, reference))
            same.append((a.argmax(-1) == b.argmax(-1)).double().mean().item())
            largest = max(largest, (a - b).abs().max().item())
        return dict(top1_agreement=float(np.mean(same)), max_abs_logit_diff=largest)


def evaluated(args, arm: str) -> bool:
    """Whether an earlier call already stored ``arm`` of this seed (a run called again continues after it)."""
    return any((folder / "eval.json").exists() for folder in args.out.glob(f"*_seed{args.seed}_{arm}"))


def time_for(args, what: str) -> None:
    """Stop before ``what`` when less than ``EVALUATION_MINUTES`` are left: the run is called again."""
    if args.deadline - time.monotonic() < 60 * EVALUATION_MINUTES:
        raise SystemExit(f"too little time left for {what}: call run {args.run} again (it continues)")


def record_arm(args, arm: str, record: dict, train_dir: Path | None = None) -> None:
    """``RESULTS/<date>_seed<S>_<arm>/``: ``config.json``, ``eval.json`` and the training log."""
    folder = evaluate.run_dir(args.out, arm=arm, seed=args.seed)
    config = dict(arm=arm, run=args.run, seed=args.seed, date=datetime.date.today().isoformat(),
                  commit=args.commit, device=str(args.device_name), smoke=args.smoke, budget=args.budget.__dict__,
                  recipe=RECIPE, kl_topk=args.kl_topk, base=args.base.name, base_sha256=args.base_sha256,
                  data_manifest_sha256=sha256(args.data / "manifest.json"), archive_sha256=args.archive_sha256,
                  versions=dict(python=platform.python_version(), torch=torch.__version__,
                                transformers=transformers.__version__, msa=msa.__version__))
    if train_dir is not None:
        config["msa_train"] = json.loads((train_dir / "run.json").read_text())
        shutil.copy(train_dir / "log.jsonl", folder / "train_log.jsonl")
    evaluate.write_json(folder / "config.json", config)
    evaluate.write_json(folder / "eval.json", record)
    console.print(f"[green]{arm}[/green] -> {folder}")


def sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------- the runs

def run_r0(args, evaluation: Evaluation) -> None:
    """``base`` (loss, suite), ``equiv`` (128 x 64: every block; loss, top-1 agreement, max |dlogit|), and the
    recall of 64 x 8 converted without warm-up (context)."""
    if not evaluated(args, "base"):
        time_for(args, "base")
        base = load_base(args)
        record_arm(args, "base", dict(loss=evaluation.loss(base),
                                      retrieval=evaluation.retrieval(base, evaluation.samples)))
    if not evaluated(args, "equiv"):
        time_for(args, "equiv")
        block_size = EQUIVALENCE_BLOCK  # x seq_len / block_size = 64 blocks: every block, on the kernels
        equiv = hf.convert(load_base(args), block_size=block_size, topk=args.budget.seq_len // block_size)
        record_arm(args, "equiv", dict(loss=evaluation.loss(equiv), **evaluation.agreement(equiv, load_base(args))))
    if not evaluated(args, "msa64x8_no_warmup"):
        time_for(args, "msa64x8_no_warmup")
        converted = hf.convert(load_base(args), block_size=PRIMARY[0], topk=PRIMARY[1])
        record_arm(args, "msa64x8_no_warmup", dict(diagnostics=evaluation.recall(converted, PRIMARY)))


def run_msa(args, evaluation: Evaluation, shape) -> None:
    """A (64 x 8) or C (32 x 8): warm-up, its evaluation, the sparse continuation, its evaluation."""
    name = f"msa{shape[0]}x{shape[1]}"
    warmup = train_arm(args, f"{name}_warmup", args.base, warmup_options(args, shape))
    if not evaluated(args, f"{name}_warmup"):
        time_for(args, f"{name}_warmup")
        model = load_trained(args, f"{name}_warmup")
        record = dict(loss=evaluation.loss(model))
        if shape == PRIMARY:  # C: the loss after the warm-up only
            record.update(retrieval=evaluation.retrieval(model, evaluation.samples, shape),
                          diagnostics=evaluation.recall(model, shape))
        record_arm(args, f"{name}_warmup", record, warmup)
        del model
    trained = train_arm(args, name, warmup / "model", continuation_options(args))
    if not evaluated(args, name):
        evaluate_msa_arm(args, evaluation, name, shape, trained)


def evaluate_msa_arm(args, evaluation: Evaluation, arm: str, shape, train_dir: Path) -> None:
    """Store the trained MSA ``arm``'s loss, retrieval suite and recall diagnostics."""
    time_for(args, arm)
    model = load_trained(args, arm)
    record_arm(args, arm, dict(loss=evaluation.loss(model),
                               retrieval=evaluation.retrieval(model, evaluation.samples, shape),
                               diagnostics=evaluation.recall(model, shape)), train_dir)


def run_b(args, evaluation: Evaluation) -> None:
    """B: the dense continuation and the eval-only selectors on it (the oracle on a smaller subset)."""
    trained = train_arm(args, "dense", args.base, ["--dense", "--steps", str(args.budget.lm_steps)])
    dense = load_trained(args, "dense")
    if not evaluated(args, "dense"):
        time_for(args, "dense")
        record_arm(args, "dense", dict(loss=evaluation.loss(dense),
                                       retrieval=evaluation.retrieval(dense, evaluation.samples)), trained)
    hf.convert(dense, block_size=PRIMARY[0], topk=PRIMARY[1])
    for kind in ("local", "random", "oracle"):
        if evaluated(args, f"sel_{kind}"):
            continue
        time_for(args, f"sel_{kind}")
        for layer, branch in enumerate(hf.msa_layers(dense)):
            branch.selector = selector(kind, PRIMARY, args.seed, layer)
        subset = evaluation.oracle_subset if kind == "oracle" else evaluation.subset
        record_arm(args, f"sel_{kind}", dict(loss=evaluation.loss(dense),
                                             retrieval=evaluation.retrieval(dense, subset)))


def run_e1(args, evaluation: Evaluation) -> None:
    """Exploratory E1 (README, outside PROTOCOL.md): the 64 x 8 warm-up alone with KL support ``--kl-topk``,
    evaluated as A's warm-up is."""
    arm = f"e1_warmup_kl{args.kl_topk}"
    warmup = train_arm(args, arm, args.base, warmup_options(args, PRIMARY))
    if not evaluated(args, arm):
        evaluate_msa_arm(args, evaluation, arm, PRIMARY, warmup)


RUNS = {"R0": run_r0, "A": lambda args, e: run_msa(args, e, PRIMARY), "B": run_b,
        "C": lambda args, e: run_msa(args, e, STRESS), "E1": run_e1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", choices=sorted(RUNS))
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the unpacked data/study folder")
    parser.add_argument("--base", type=Path, required=True, help="SmolLM2-135M-Instruct's GGUF file")
    parser.add_argument("--archive", type=Path, default=None, help="study.tar.xz (its sha256 is recorded)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/smollm2"), help="msa train runs and checkpoints")
    parser.add_argument("--out", type=Path, required=True, help="the results folder")
    parser.add_argument("--minutes", type=float, default=9.0, help="start no new arm after this long")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--kl-topk", type=int, default=KL_TOPK, help="the KL support in blocks (E1 only; the "
                        f"protocol's runs take {KL_TOPK})")
    args = parser.parse_args()
    if args.kl_topk != KL_TOPK and args.run != "E1":
        parser.error(f"--kl-topk: PROTOCOL.md's runs take {KL_TOPK}; other supports are the exploratory run E1's")
    args.deadline = time.monotonic() + 60 * args.minutes
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.device_name = torch.cuda.get_device_name() if args.device.type == "cuda" else platform.processor() or "cpu"
    args.budget = replace(SMOKE) if args.smoke else Budget()
    args.commit = args.commit or git_commit()
    args.base_sha256 = sha256(args.base)
    args.archive_sha256 = sha256(args.archive) if args.archive else None
    RUNS[args.run](args, Evaluation(args))


if __name__ == "__main__":
    main()
