"""Integrations of MSA into model libraries: :mod:`msa.integrations.hf` (Hugging Face transformers)."""
