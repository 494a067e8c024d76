"""Training MSA models: the paper's recipe (:mod:`msa.training.recipe`), token corpora and batches with
retrieval needles (:mod:`msa.training.data`), tokenizers (:mod:`msa.training.tokens`) and model directories
(:mod:`msa.training.checkpoint`)."""

from msa.training.checkpoint import load_model, save_model
from msa.training.recipe import RecipeConfig, Trainer, evaluate

__all__ = ["RecipeConfig", "Trainer", "evaluate", "load_model", "save_model"]
