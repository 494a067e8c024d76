"""The paper's MSA training recipe: indexer warm-up, then sparse training with the KL loss.

1. **Indexer warm-up** (``warmup_steps``): the Main Branch runs dense
   attention; only the Index Branch is trained, by the KL loss alone (the
   rest of the model is frozen).
2. **Sparse training**: the Main Branch attends to the selected blocks; every
   parameter trains on ``lm_loss + kl_weight * kl_loss``. The detach rules of
   the layers hold throughout: the KL loss reaches only the index projections,
   the LM loss never does.

A model without MSA layers trains on the LM loss alone (the dense baseline).
Works on :class:`msa.nn.MSATransformer` and on Hugging Face models converted
by :func:`msa.integrations.hf.convert`. Checkpoints (model, optimizer, step)
go to ``out_dir/checkpoint.pt`` and a run resumes from it; every evaluation
is appended to ``out_dir/log.jsonl``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from msa.nn.transformer import MSATransformer


@dataclass
class RecipeConfig:
    steps: int = 1000  # all optimizer steps, warm-up included
    warmup_steps: int = 0  # indexer warm-up steps (MSA models)
    kl_weight: float = 0.1
    lr: float = 3e-4
    index_lr: float = 1e-3
    lr_warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay down to lr * min_lr_ratio
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
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
    """Runs :class:`RecipeConfig` on ``model`` with ``train_batches(step) -> [B, S]`` token batches."""

    def __init__(self, model: nn.Module, config: RecipeConfig, train_batches: Callable[[int], torch.Tensor],
                 eval_batches: list[torch.Tensor], out_dir: str | Path, *, name: str = "train"):
        self.model, self.config, self.train_batches, self.eval_batches = model, config, train_batches, eval_batches
        self.out_dir, self.name = Path(out_dir), name
        self.api = ModelApi(model)
        if config.warmup_steps and not self.api.is_msa:
            raise ValueError("warmup_steps > 0 needs a model with MSA layers (the indexer warm-up trains them)")
        index_ids = {id(p) for p in self.api.index_parameters}
        main = [p for p in model.parameters() if id(p) not in index_ids]
        groups = [dict(params=main, lr=config.lr, weight_decay=config.weight_decay)]
        if self.api.index_parameters:
            groups.append(dict(params=self.api.index_parameters, lr=config.index_lr, weight_decay=0.0))
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
        self.base_lrs = [group["lr"] for group in groups]
        self.step, self.log = 0, []
        self._resume()

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def _resume(self) -> None:
        if self.checkpoint_path.exists():
            state = torch.load(self.checkpoint_path, map_location=next(self.model.parameters()).device,
                               weights_only=False)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step, self.log = state["step"], state["log"]

    def save_checkpoint(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.checkpoint_path.with_suffix(".tmp")
        torch.save(dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), step=self.step,
                        log=self.log, config=asdict(self.config)), temporary)
        temporary.replace(self.checkpoint_path)

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
        config = self.config
        ramp = min(1.0, (step + 1) / max(1, config.lr_warmup_steps))
        progress = step / max(1, config.steps)
        decay = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * ramp * decay

    def _record(self, record: dict) -> None:
        self.log.append(record)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / "log.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def run(self) -> list[dict]:
        """Train to ``config.steps`` (or ``max_seconds``); returns the log of evaluations."""
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
            task = progress.add_task(self.name, total=config.steps, completed=self.step, status="")
            while self.step < config.steps:
                if phase != self.phase(self.step):
                    phase = self.phase(self.step)
                    self._enter(phase)
                batch = self.train_batches(self.step).to(device)
                self._set_lr(self.step)
                with torch.autocast(**autocast):
                    logits, kl = self.api(batch)
                lm = lm_loss(logits, batch)
                loss = kl if phase == "warmup" else lm + (config.kl_weight * kl if kl is not None else 0.0)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
                self.optimizer.step()
                self.step += 1
                tokens += batch.numel()
                lm_sum, kl_sum, n_sum = lm_sum + lm.item(), kl_sum + (kl.item() if kl is not None else 0.0), n_sum + 1
                progress.update(task, completed=self.step, status=f"{phase} lm {lm.item():.3f}"
                                + (f" kl {kl.item():.3f}" if kl is not None else ""))
                elapsed = time.monotonic() - start
                done = self.step == config.steps or (config.max_seconds is not None and elapsed > config.max_seconds)
                if self.step % config.eval_every == 0 or done:
                    self._record(dict(step=self.step, phase=phase, train_lm=lm_sum / n_sum, train_kl=kl_sum / n_sum,
                                      val_loss=evaluate(model, self.eval_batches, config.bf16),
                                      tokens_per_s=tokens / elapsed, elapsed_s=elapsed))
                    lm_sum, kl_sum, n_sum = 0.0, 0.0, 0
                if done or time.monotonic() - last_checkpoint > config.checkpoint_every_s:
                    self.save_checkpoint()
                    last_checkpoint = time.monotonic()
                if done:
                    break
        return self.log
