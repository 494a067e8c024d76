"""``msa train``: the MSA training recipe (indexer warm-up, then sparse training with the KL loss).

From scratch (a new :class:`msa.nn.MSATransformer`, or a Hugging Face Llama
with ``--arch llama``) or from a dense checkpoint (``--init DIR``, any
Hugging Face Llama/Qwen2/Qwen3/Mistral causal LM saved with
``save_pretrained``; converted to MSA in place). ``--dense`` trains without
MSA (the baseline). Byte-level tokens; without ``--data`` the run trains on
this package's own source code, a small default that finishes in a minute
or two on a CPU. Checkpoints and ``log.jsonl`` go to ``--out``; a rerun
resumes; the final model is saved to ``--out/model``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import torch

import msa
from msa.fp8 import FP8_DTYPE, FP8_NAME
from msa.nn import MSAConfig, MSATransformer
from msa.training import RecipeConfig, Trainer
from msa.training.data import VOCAB_SIZE, ByteBatches, load_bytes


def add_parser(commands) -> None:
    parser = commands.add_parser("train", help="train an MSA model with the paper's recipe",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="training text: a file, a .bin of bytes or a dir")
    parser.add_argument("--val-data", type=Path, default=None, help="held-out text (default: the last 5%% of --data)")
    parser.add_argument("--init", type=Path, default=None, help="a dense Hugging Face checkpoint to convert")
    parser.add_argument("--arch", choices=["msa", "llama"], default="msa", help="new model (without --init)")
    parser.add_argument("--dense", action="store_true", help="no MSA: the dense baseline (Hugging Face models)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--kl-topk", type=int, default=None,
                        help="the KL loss's support: the top KL_TOPK blocks (default: the selected ones)")
    parser.add_argument("--fp8-index", action="store_true", help="rank blocks with FP8 index vectors (msa.fp8)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--needle-rate", type=float, default=0.0, help="fraction of sequences with retrieval needles")
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/train"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    for field in fields(RecipeConfig):
        default = dict(steps=60, warmup_steps=20, eval_every=20).get(field.name, field.default)
        kind = float if field.type in ("float", "float | None") else int if field.type == "int" else None
        if kind is not None:
            parser.add_argument("--" + field.name.replace("_", "-"), type=kind, default=default)
    parser.set_defaults(run=run)


def _new_model(args, device) -> torch.nn.Module:
    head_dim = args.hidden // args.heads
    if args.arch == "msa":
        if args.dense:
            raise ValueError("--dense needs --arch llama or --init (an MSATransformer is always MSA)")
        config = MSAConfig(vocab_size=VOCAB_SIZE, hidden_size=args.hidden, num_layers=args.layers,
                           num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=head_dim,
                           intermediate_size=3 * args.hidden, index_head_dim=head_dim, block_size=args.block_size,
                           topk=args.topk, kl_topk=args.kl_topk, index_dtype=FP8_NAME if args.fp8_index else None)
        return MSATransformer(config).to(device)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq_len, 4096),
                         rope_theta=500000.0)
    return LlamaForCausalLM(config).to(device)


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    data = load_bytes(args.data or Path(msa.__file__).parent)
    val = load_bytes(args.val_data) if args.val_data else data[int(0.95 * len(data)):]
    train = data if args.val_data else data[: int(0.95 * len(data))]
    if args.init is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.init).to(device)
    else:
        model = _new_model(args, device)
    if not isinstance(model, MSATransformer) and not args.dense:
        from msa.integrations import hf

        hf.convert(model, block_size=args.block_size, topk=args.topk, kl_topk=args.kl_topk,
                   index_dtype=FP8_DTYPE if args.fp8_index else None)
    recipe = RecipeConfig(**{f.name: getattr(args, f.name) for f in fields(RecipeConfig) if hasattr(args, f.name)})
    if args.dense:
        recipe.warmup_steps = 0
    eval_source = ByteBatches(val, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed + 1,
                              needle_rate=args.needle_rate)
    trainer = Trainer(model, recipe, ByteBatches(train, batch_size=args.batch_size, seq_len=args.seq_len,
                                                 seed=args.seed, needle_rate=args.needle_rate),
                      [eval_source(i) for i in range(args.eval_batches)], args.out)
    log = trainer.run()
    out = args.out / "model"
    if isinstance(model, MSATransformer):
        out.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out / "model.pt")
        (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    else:
        model.save_pretrained(out)
    print(json.dumps(log[-1]))
    return 0
