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

``parallel`` (a :class:`msa.training.parallel.Parallel`, under ``torchrun``)
trains over data-parallel and context-parallel ranks: the model is sharded
with FSDP2, each rank runs its share of every batch, and rank 0 alone
writes the log and the checkpoints (see :mod:`msa.training.parallel`).
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
from msa.training.parallel import Parallel
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

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._hf is None:
            return self.model(input_ids, position_ids=position_ids)
        return self.model(input_ids=input_ids, position_ids=position_ids).logits, self._hf.kl_loss(self.model)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, in float32 at least (float64 logits stay float64)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor], bf16: bool = True,
             parallel: Parallel | None = None) -> float:
    """Mean next-token loss over ``batches`` (eval mode, no KL loss); NaN without batches. With ``parallel``
    every rank must call it with the same (whole) batches; each runs its share of them."""
    if not batches:
        return math.nan
    api, training = ModelApi(model), model.training
    model.eval()
    device = parallel.device if parallel is not None else next(model.parameters()).device
    losses = []
    for batch in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            if parallel is None:
                logits, _ = api(batch.to(device))
                losses.append(lm_loss(logits, batch.to(device)).item())
            else:
                input_ids, position_ids, labels = parallel.inputs(batch)
                logits, _ = api(input_ids, position_ids)
                losses.append(parallel.eval_loss(logits, labels))
    if parallel is not None:
        parallel.reshard(model)
    model.train(training)
    return sum(losses) / len(losses)


class Trainer:
    """Runs :class:`RecipeConfig` on ``model``.

    ``train_batches(i)`` and ``warmup_batches(i)`` return the token batch
    (int64 ``[B, S]``) of LM update ``i`` and of warm-up update ``i``
    (``warmup_batches`` is needed when ``config.warmup_steps`` > 0).
    ``tokenizer`` is saved beside the model in checkpoints. With
    ``parallel`` the batches are the global ones, the same on every rank, and
    ``model`` (the same on every rank) is sharded in place before the
    optimizer is built.
    """

    def __init__(self, model: nn.Module, config: RecipeConfig, train_batches: Callable[[int], torch.Tensor],
                 eval_batches: list[torch.Tensor], out_dir: str | Path, *,
                 warmup_batches: Callable[[int], torch.Tensor] | None = None, tokenizer: Tokenizer | None = None,
                 resume: bool = False, name: str = "train", parallel: Parallel | None = None):
        self.model, self.config, self.eval_batches, self.tokenizer = model, config, eval_batches, tokenizer
        self.train_batches, self.warmup_batches = train_batches, warmup_batches
        self.out_dir, self.name, self.parallel = Path(out_dir), name, parallel
        if parallel is not None:
            parallel.shard_model(model)
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
        if self.is_main:
            recover_directory(self.checkpoint_dir)
        self._barrier()
        if resume:
            self._resume()
        elif self.checkpoint_dir.exists() or self.log_path.exists():
            raise FileExistsError(f"{self.out_dir} holds a run already; resume it (resume=True) or choose another "
                                  "out_dir")
        self._barrier()

    @property
    def is_main(self) -> bool:
        """Whether this process writes the log and the checkpoints: rank 0, or the only process."""
        return self.parallel is None or self.parallel.is_main

    def _agree(self, flag: bool) -> bool:
        """``flag`` of this process; under ``parallel``, true if true on any rank (decisions taken on the ranks'
        own clocks, made the same everywhere)."""
        return flag if self.parallel is None else self.parallel.any([flag])[0]

    def _barrier(self) -> None:
        if self.parallel is not None:
            self.parallel.barrier()

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
            device = parameter.device if self.parallel is None else torch.device("cpu")
            saved, _ = load_model(self.checkpoint_dir, device=device, dtype=parameter.dtype)
            state = torch.load(self.checkpoint_dir / "optimizer.pt", map_location=device, weights_only=True)
            if self.parallel is None:
                self.model.load_state_dict(saved.state_dict())
                self.optimizer.load_state_dict(state["optimizer"])
            else:
                self.parallel.load_state_dicts(self.model, self.optimizer, saved.state_dict(), state["optimizer"])
            self.step, covered = state["step"], state["log_records"]
        if len(lines) < covered:
            raise ValueError(f"{self.log_path} has {len(lines)} records, fewer than the {covered} its checkpoint "
                             "was written after")
        self.log = [json.loads(line) for line in lines[:covered]]  # a record cut off by a crash is dropped too
        if self.is_main:
            temporary = self.log_path.with_suffix(".tmp")
            self.out_dir.mkdir(parents=True, exist_ok=True)
            temporary.write_text("".join(json.dumps(record) + "\n" for record in self.log))
            temporary.replace(self.log_path)

    def _model_state_dict(self) -> dict | None:
        """Under ``parallel`` the whole model's state dict, gathered to rank 0 (every rank must call it); else None:
        the model's own."""
        return None if self.parallel is None else self.parallel.model_state_dict(self.model)

    def save_model(self, directory: str | Path) -> None:
        """Write the model (and the tokenizer) as :func:`msa.training.save_model` does, from rank 0 under
        ``parallel`` (every rank must call it)."""
        state_dict = self._model_state_dict()
        if self.is_main:
            replace_directory(directory, lambda path: save_model(self.model, path, self.tokenizer, state_dict))
        self._barrier()

    def save_checkpoint(self) -> None:
        """Every rank must call it under ``parallel``: the state is gathered to rank 0, which writes it."""
        state_dict = self._model_state_dict()
        if self.parallel is None:
            optimizer = self.optimizer.state_dict()
        else:
            optimizer = self.parallel.optimizer_state_dict(self.model, self.optimizer)

        def write(directory: Path) -> None:
            save_model(self.model, directory, self.tokenizer, state_dict)
            torch.save(dict(optimizer=optimizer, step=self.step, log_records=len(self.log)), directory / "optimizer.pt")

        if self.is_main:
            replace_directory(self.checkpoint_dir, write)
        self._barrier()

    def _record(self, record: dict) -> None:
        self.log.append(record)
        if self.is_main:
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
        config, model, parallel = self.config, self.model, self.parallel
        device = next(model.parameters()).device if parallel is None else parallel.device
        autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=config.bf16 and device.type == "cuda")
        start, last_checkpoint = time.monotonic(), time.monotonic()
        model.train()
        phase = None
        tokens, lm_sum, kl_sum, n_sum = 0, 0.0, 0.0, 0
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn())
        with Progress(*columns, disable=not self.is_main) as progress:
            task = progress.add_task(self.name, total=self.total_steps, completed=self.step, status="")
            while not self.finished:
                if phase != self.phase(self.step):
                    phase = self.phase(self.step)
                    self._enter(phase)
                self._set_lr(self.step)
                batch = self._batch(self.step)
                if parallel is None:
                    input_ids, position_ids = batch.to(device), None
                else:
                    input_ids, position_ids, labels = parallel.inputs(batch)
                with torch.autocast(**autocast):
                    logits, kl = self.api(input_ids, position_ids)
                lm = lm_loss(logits, input_ids) if parallel is None else parallel.lm_loss(logits, labels)
                loss = kl if phase == "warmup" else lm + (config.kl_weight * kl if kl is not None else 0.0)
                self.optimizer.zero_grad(set_to_none=True)
                (loss if parallel is None else loss * parallel.backward_scale()).backward()
                for group in self.optimizer.param_groups:  # apart: the KL gradients never shrink an LM update
                    nn.utils.clip_grad_norm_([p for p in group["params"] if p.grad is not None], config.grad_clip)
                self.optimizer.step()
                self.step += 1
                tokens += batch.numel()
                values = [lm.item(), kl.item() if kl is not None else 0.0]
                if parallel is not None:  # the global batch's losses
                    values = parallel.dp_mean(values)
                lm_sum, kl_sum, n_sum = lm_sum + values[0], kl_sum + values[1], n_sum + 1
                progress.update(task, completed=self.step, status=f"{phase} lm {values[0]:.3f}"
                                + (f" kl {values[1]:.3f}" if kl is not None else ""))
                elapsed = time.monotonic() - start
                stop = self.finished or self._agree(config.max_seconds is not None and elapsed > config.max_seconds)
                if self._evaluation_due() or stop:
                    self._record(dict(step=self.step, lm_steps=max(0, self.step - config.warmup_steps), phase=phase,
                                      train_lm=lm_sum / n_sum, train_kl=kl_sum / n_sum,
                                      val_loss=evaluate(model, self.eval_batches, config.bf16, parallel),
                                      tokens_per_s=tokens / elapsed, elapsed_s=elapsed))
                    lm_sum, kl_sum, n_sum = 0.0, 0.0, 0
                if stop or self._agree(time.monotonic() - last_checkpoint > config.checkpoint_every_s):
                    self.save_checkpoint()
                    last_checkpoint = time.monotonic()
                if stop:
                    break
        if self.finished:  # what the run trained: an MSA model attends sparsely, a warm-up-only run's too
            self._enter(self.phase(self.total_steps))
        return self.log
