"""Model directories: a model as safetensors + a JSON config, its tokenizer beside it, written atomically.

Two layouts, both read by :func:`load_model`:

* :class:`msa.nn.MSATransformer`: ``model.safetensors`` (the state dict) and
  ``config.json`` (its :class:`msa.nn.MSAConfig`);
* Hugging Face causal LMs, dense or converted to MSA: what ``save_pretrained``
  writes (an MSA model's config marks it, and
  :func:`msa.integrations.hf.from_pretrained` loads it with its Index Branch).

The tokenizer is saved beside the model (see :mod:`msa.training.tokens`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

from msa.nn import MSAConfig, MSATransformer
from msa.training.tokens import Tokenizer, load_saved_tokenizer

MSA_TRANSFORMER_WEIGHTS = "model.safetensors"


def save_model(model: nn.Module, directory: str | Path, tokenizer: Tokenizer | None = None,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``model`` (and ``tokenizer``) into ``directory`` (created if needed); ``state_dict`` replaces the
    model's own (the whole state dict of a model sharded over processes)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(model, MSATransformer):
        state_dict = model.state_dict() if state_dict is None else state_dict
        save_file({name: tensor.contiguous() for name, tensor in state_dict.items()},
                  directory / MSA_TRANSFORMER_WEIGHTS)
        (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    else:
        model.save_pretrained(directory, **({} if state_dict is None else dict(state_dict=state_dict)))
    if tokenizer is not None:
        tokenizer.save(directory)


def replace_directory(target: str | Path, write: Callable[[Path], None]) -> None:
    """Make ``target`` the directory ``write(path)`` fills: it is written beside ``target`` and renamed, so a
    crash leaves the previous ``target`` (or ``target.old``, which :func:`recover_directory` puts back), never
    a half-written one."""
    target = Path(target)
    temporary, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    write(temporary)
    recover_directory(target)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    temporary.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def recover_directory(target: str | Path) -> None:
    """Put back ``target`` from ``target.old`` if :func:`replace_directory` was cut off between its renames."""
    target = Path(target)
    old = target.with_name(target.name + ".old")
    if not target.exists() and old.exists():
        old.rename(target)


def is_msa_transformer_config(config: dict) -> bool:
    """A ``config.json`` written for an :class:`MSATransformer` (Hugging Face configs have a ``model_type``)."""
    return "model_type" not in config and set(config) <= {field.name for field in fields(MSAConfig)}


def load_model(directory: str | Path, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> tuple[nn.Module, Tokenizer | None]:
    """The model saved in ``directory`` and its tokenizer (None if none was saved beside it).

    An :class:`MSATransformer` directory gives an :class:`MSATransformer`; a
    Hugging Face directory gives :func:`msa.integrations.hf.from_pretrained`'s
    model for an MSA checkpoint and ``AutoModelForCausalLM``'s for a dense
    one. ``dtype`` None keeps the saved dtype.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{directory} holds no model (no config.json)")
    config = json.loads(config_path.read_text())
    if is_msa_transformer_config(config):
        from safetensors.torch import load_file

        state_dict = load_file(directory / MSA_TRANSFORMER_WEIGHTS)
        saved_dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)
        # in the final dtype before loading: a float64 state dict goes through no float32 copy
        model = MSATransformer(MSAConfig(**config)).to(device=device, dtype=dtype or saved_dtype)
        model.load_state_dict(state_dict)
    elif "model_type" in config:
        from transformers import AutoModelForCausalLM

        from msa.integrations import hf

        load = hf.from_pretrained if hf.is_msa_checkpoint(directory) else AutoModelForCausalLM.from_pretrained
        model = load(directory, **({} if dtype is None else dict(dtype=dtype)))
        if device is not None:
            model.to(device)
    else:
        raise ValueError(f"{config_path} is neither an MSATransformer config (MSAConfig fields) nor a Hugging Face "
                         "config (with a model_type)")
    return model, load_saved_tokenizer(directory)
