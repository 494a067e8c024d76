"""Hugging Face transformers (v5) decoders with GQA made MSA in place: Llama, Qwen2, Qwen3, Mistral families.

    model = AutoModelForCausalLM.from_pretrained(...)
    msa.integrations.hf.convert(model, block_size=128, topk=16)   # every layer, or layers=[...]
    loss = model(input_ids, labels=input_ids).loss + kl_weight * msa.integrations.hf.kl_loss(model)
    model.save_pretrained(out)                      # safetensors + a config of model type msa_<family>
    model = AutoModelForCausalLM.from_pretrained(out)   # the MSA model (this module registers the types)
    model.generate(input_ids, max_new_tokens=64)    # prefill and decode over MSA's paged KV cache

:mod:`~msa.integrations.hf.modeling` holds the Index Branch, ``convert`` and
the model classes; :mod:`~msa.integrations.hf.cache` the ``MSACache`` that
``generate()`` runs on.
"""

from msa.integrations.hf.cache import MSACache
from msa.integrations.hf.modeling import (HFIndexBranch, convert, from_pretrained, index_parameters,
                                          is_msa_checkpoint, kl_loss, msa_classes, msa_layers, set_mode)
from msa.nn import IndexBranch

__all__ = ["HFIndexBranch", "IndexBranch", "MSACache", "convert", "from_pretrained", "index_parameters",
           "is_msa_checkpoint", "kl_loss", "msa_classes", "msa_layers", "set_mode"]
