"""The paper's MSA training recipe: indexer warm-up, then training with the KL loss.

1. **Indexer warm-up** (``warmup_steps`` updates): the Main Branch runs dense
   attention; only the Index Branch is trained, by the KL loss alone (the
   rest of the model is frozen), at the constant ``index_lr``. Its batches
   come from a stream of their own (``warmup_batches``).
2. **LM training** (``steps`` updates): the Main Branch attends to the
   selected blocks; every parameter trains on ``lm_loss + kl_weight *
   kl_loss``. The detach rules of the layers hold throughout: the KL loss
   reaches only the index projections, the LM loss never does.

A model without MSA layers trains on the LM loss alone (the dense baseline).
The warm-up consumes no LM batch and no LM schedule step: LM update ``i``
of a dense run and of an MSA run sees the same batch ``train_batches(i)`` at
the same learning rate. Works on :class:`msa.nn.MSATransformer` and on
Hugging Face models converted by :func:`msa.integrations.hf.convert`.

``out_dir`` holds ``checkpoint/`` (the model as in
:mod:`msa.training.checkpoint`, plus ``optimizer.pt``: optimizer state, step
and how many log records it covers) and ``log.jsonl`` (one record per
evaluation). A run resumes from its checkpoint only when asked
(``resume=True``); the log is then cut back to the checkpoint's records.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from msa.nn.transformer import MSATransformer
from msa.training.checkpoint import load_model, recover_directory, replace_directory, save_model
from msa.training.tokens import Tokenizer


@dataclass
class RecipeConfig:
    steps: int = 1000  # LM updates, the same for a dense run and an MSA run
    warmup_steps: int = 0  # indexer warm-up updates before them (MSA models only)
    kl_weight: float = 0.1
    lr: float = 3e-4
    index_lr: float = 1e-3  # Index Branch: constant in the warm-up, then on the LM schedule
    lr_warmup_steps: int = 50  # LM schedule: linear ramp over these LM updates, then a cosine
    min_lr_ratio: float = 0.1  # cosine decay down to lr * min_lr_ratio at the last LM update
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # the norm each parameter group (model weights, Index Branch) is clipped to
    eval_every: int = 100  # updates between evaluations (counted within each phase; and at each phase's end)
    checkpoint_every_s: float = 120.0
    max_seconds: float | None = None  # stop (after a checkpoint) when this much time has passed
    bf16: bool = True  # autocast on CUDA


class ModelApi:
    """What the recipe needs from a model: logits + KL loss, the mode switch, the Index Branch parameters."""

    def __init__(self, model: nn.Module):
        self.model = model
        if isinstance(model, MSATransformer):
            self.index_parameters = [p for name, p in model.named_parameters() if ".index_" in name]
            self.set_mode = model.set_mode
            self._hf = None
        else:
            from msa.integrations import hf  # transformers is needed for these models only

            self._hf = hf
            self.index_parameters = hf.index_parameters(model)
            self.set_mode = (lambda mode: hf.set_mode(model, mode)) if self.index_parameters else (lambda mode: None)

    @property
    def is_msa(self) -> bool:
        return bool(self.index_parameters)

    def __call__(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._hf is None:
            return self.model(input_ids)
        return self.model(input_ids=input_ids).logits, self._hf.kl_loss(self.model)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor], bf16: bool = True) -> float:
    """Mean next-token loss over ``batches`` (eval mode, no KL loss); NaN without batches."""
    if not batches:
        return math.nan
    api, training = ModelApi(model), model.training
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for batch in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            logits, _ = api(batch.to(device))
        losses.append(lm_loss(logits, batch.to(device)).item())
    model.train(training)
    return sum(losses) / len(losses)


class Trainer:
    """Runs :class:`RecipeConfig` on ``model``.

    ``train_batches(i)`` and ``warmup_batches(i)`` return the token batch
    (int64 ``[B, S]``) of LM update ``i`` and of warm-up update ``i``
    (``warmup_batches`` is needed when ``config.warmup_steps`` > 0).
    ``tokenizer`` is saved beside the model in checkpoints.
    """

    def __init__(self, model: nn.Module, config: RecipeConfig, train_batches: Callable[[int], torch.Tensor],
                 eval_batches: list[torch.Tensor], out_dir: str | Path, *,
                 warmup_batches: Callable[[int], torch.Tensor] | None = None, tokenizer: Tokenizer | None = None,
                 resume: bool = False, name: str = "train"):
        self.model, self.config, self.eval_batches, self.tokenizer = model, config, eval_batches, tokenizer
        self.train_batches, self.warmup_batches = train_batches, warmup_batches
        self.out_dir, self.name = Path(out_dir), name
        self.api = ModelApi(model)
        if config.warmup_steps and not self.api.is_msa:
            raise ValueError("warmup_steps > 0 needs a model with MSA layers (the indexer warm-up trains them)")
        if config.warmup_steps and warmup_batches is None:
            raise ValueError("warmup_steps > 0 needs warmup_batches (the warm-up's own batches)")
        index_ids = {id(p) for p in self.api.index_parameters}
        main = [p for p in model.parameters() if id(p) not in index_ids]
        groups = [dict(params=main, lr=config.lr, weight_decay=config.weight_decay)]
        if self.api.index_parameters:
            groups.append(dict(params=self.api.index_parameters, lr=config.index_lr, weight_decay=0.0))
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
        self.base_lrs = [group["lr"] for group in groups]
        self.step, self.log = 0, []  # updates done (warm-up included), evaluation records
        recover_directory(self.checkpoint_dir)
        if resume:
            self._resume()
        elif self.checkpoint_dir.exists() or self.log_path.exists():
            raise FileExistsError(f"{self.out_dir} holds a run already; resume it (resume=True) or choose another "
                                  "out_dir")

    @property
    def total_steps(self) -> int:
        return self.config.warmup_steps + self.config.steps

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    # ------------------------------------------------------------------ checkpoints and log

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    @property
    def log_path(self) -> Path:
        return self.out_dir / "log.jsonl"

    def _resume(self) -> None:
        """Load the checkpoint, if any, and cut the log back to the records it covers."""
        lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
        covered = 0
        if self.checkpoint_dir.exists():
            parameter = next(self.model.parameters())
            saved, _ = load_model(self.checkpoint_dir, device=parameter.device, dtype=parameter.dtype)
            self.model.load_state_dict(saved.state_dict())
            state = torch.load(self.checkpoint_dir / "optimizer.pt", map_location=parameter.device, weights_only=True)
            self.optimizer.load_state_dict(state["optimizer"])
            self.step, covered = state["step"], state["log_records"]
        if len(lines) < covered:
            raise ValueError(f"{self.log_path} has {len(lines)} records, fewer than the {covered} its checkpoint "
                             "was written after")
        self.log = [json.loads(line) for line in lines[:covered]]  # a record cut off by a crash is dropped too
        temporary = self.log_path.with_suffix(".tmp")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        temporary.write_text("".join(json.dumps(record) + "\n" for record in self.log))
        temporary.replace(self.log_path)

    def save_checkpoint(self) -> None:
        def write(directory: Path) -> None:
            save_model(self.model, directory, self.tokenizer)
            torch.save(dict(optimizer=self.optimizer.state_dict(), step=self.step, log_records=len(self.log)),
                       directory / "optimizer.pt")

        replace_directory(self.checkpoint_dir, write)

    def _record(self, record: dict) -> None:
        self.log.append(record)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ training

    def phase(self, step: int) -> str:
        if not self.api.is_msa:
            return "dense"
        return "warmup" if step < self.config.warmup_steps else "sparse"

    def _enter(self, phase: str) -> None:
        """Mode and trainable parameters of a phase: the warm-up trains the Index Branch alone."""
        if self.api.is_msa:
            self.api.set_mode("dense" if phase == "warmup" else "sparse")
        index_ids = {id(p) for p in self.api.index_parameters}
        for p in self.model.parameters():
            p.requires_grad_(phase != "warmup" or id(p) in index_ids)

    def _set_lr(self, step: int) -> None:
        """Warm-up: the base learning rates (only the Index Branch trains). LM update ``i``: a linear ramp over
        ``lr_warmup_steps``, then a cosine down to ``min_lr_ratio``, over ``steps`` LM updates."""
        config = self.config
        lm_step = step - config.warmup_steps
        factor = 1.0
        if lm_step >= 0:
            ramp = min(1.0, (lm_step + 1) / max(1, config.lr_warmup_steps))
            progress = lm_step / max(1, config.steps)
            factor = ramp * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def _batch(self, step: int) -> torch.Tensor:
        warmup_steps = self.config.warmup_steps
        return self.warmup_batches(step) if step < warmup_steps else self.train_batches(step - warmup_steps)

    def _evaluation_due(self) -> bool:
        """After warm-up or LM update ``n`` of its phase: every ``eval_every`` updates and at the phase's end."""
        config, step = self.config, self.step
        if step <= config.warmup_steps:
            return step % config.eval_every == 0 or step == config.warmup_steps
        lm_steps = step - config.warmup_steps
        return lm_steps % config.eval_every == 0 or lm_steps == config.steps

    def run(self) -> list[dict]:
        """Train to ``warmup_steps + steps`` updates (or ``max_seconds``); returns the log of evaluations.

        Log records: ``step`` (updates done, warm-up included), ``lm_steps``
        (LM updates done), ``phase``, the mean ``train_lm`` / ``train_kl``
        losses since the last record, ``val_loss``, ``tokens_per_s``,
        ``elapsed_s`` (this session's).
        """
        config, model = self.config, self.model
        device = next(model.parameters()).device
        autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=config.bf16 and device.type == "cuda")
        start, last_checkpoint = time.monotonic(), time.monotonic()
        model.train()
        phase = None
        tokens, lm_sum, kl_sum, n_sum = 0, 0.0, 0.0, 0
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn())
        with Progress(*columns) as progress:
            task = progress.add_task(self.name, total=self.total_steps, completed=self.step, status="")
            while not self.finished:
                if phase != self.phase(self.step):
                    phase = self.phase(self.step)
                    self._enter(phase)
                self._set_lr(self.step)
                batch = self._batch(self.step).to(device)
                with torch.autocast(**autocast):
                    logits, kl = self.api(batch)
                lm = lm_loss(logits, batch)
                loss = kl if phase == "warmup" else lm + (config.kl_weight * kl if kl is not None else 0.0)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for group in self.optimizer.param_groups:  # apart: the KL gradients never shrink an LM update
                    nn.utils.clip_grad_norm_([p for p in group["params"] if p.grad is not None], config.grad_clip)
                self.optimizer.step()
                self.step += 1
                tokens += batch.numel()
                lm_sum, kl_sum, n_sum = lm_sum + lm.item(), kl_sum + (kl.item() if kl is not None else 0.0), n_sum + 1
                progress.update(task, completed=self.step, status=f"{phase} lm {lm.item():.3f}"
                                + (f" kl {kl.item():.3f}" if kl is not None else ""))
                elapsed = time.monotonic() - start
                stop = self.finished or (config.max_seconds is not None and elapsed > config.max_seconds)
                if self._evaluation_due() or stop:
                    self._record(dict(step=self.step, lm_steps=max(0, self.step - config.warmup_steps), phase=phase,
                                      train_lm=lm_sum / n_sum, train_kl=kl_sum / n_sum,
                                      val_loss=evaluate(model, self.eval_batches, config.bf16),
                                      tokens_per_s=tokens / elapsed, elapsed_s=elapsed))
                    lm_sum, kl_sum, n_sum = 0.0, 0.0, 0
                if stop or time.monotonic() - last_checkpoint > config.checkpoint_every_s:
                    self.save_checkpoint()
                    last_checkpoint = time.monotonic()
                if stop:
                    break
        if self.finished:  # what the run trained: an MSA model attends sparsely, a warm-up-only run's too
            self._enter(self.phase(self.total_steps))
        return self.log
