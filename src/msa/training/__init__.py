"""Training MSA models: the paper's recipe (:mod:`msa.training.recipe`) and byte-level data with retrieval
needles (:mod:`msa.training.data`)."""

from msa.training.recipe import RecipeConfig, Trainer, evaluate

__all__ = ["RecipeConfig", "Trainer", "evaluate"]
