"""``msa train``: the MSA training recipe (indexer warm-up, then LM training with the KL loss).

Model: a new :class:`msa.nn.MSATransformer` (``--arch msa``, the default) or
Hugging Face Llama (``--arch llama``), or ``--init``: a Hugging Face
Llama/Qwen2/Qwen3/Mistral-family causal LM directory (dense: converted to
MSA; already MSA: trained on, its Index Branch included), a model directory
this command wrote, or a ``.gguf`` file (needs the ``gguf`` package);
``--init`` loads in float32, the master weights (on CUDA the steps compute
under bf16 autocast). ``--dense`` trains without MSA: the baseline, which
sees the same LM batches as an MSA run.

Tokens: ``--init``'s own tokenizer, or ``--tokenizer`` (a tokenizer.json or a
directory ``AutoTokenizer`` loads, local files only); bytes (vocabulary 256)
for new models without ``--tokenizer``.

Data: ``--data``, a UTF-8 text file, a directory (its text files,
recursively: binary files, ``__pycache__`` and hidden files are skipped) or
a ``.npy`` array of token ids; without it, this package's ``.py`` files (a
small corpus that trains in a minute or two on a CPU). The last 5% are held
out unless ``--val-data`` is given. ``--steps`` counts LM updates; the
``--warmup-steps`` of the indexer warm-up (MSA only) come first and draw
their own batches (another seed stream, of ``--warmup-data`` if given).

``--out`` gets ``run.json`` (the settings), ``log.jsonl`` (the evaluations),
``checkpoint/`` (model + tokenizer + ``optimizer.pt``) and, at the end,
``model/`` (``msa generate --model OUT/model``). A run in ``--out`` continues
only with ``--resume`` and the same settings.

Several processes: ``torchrun --nproc-per-node N -m msa train --cp C
...`` trains an MSATransformer on N / C data-parallel ranks, each sequence
split over C context-parallel ranks, the model sharded with FSDP2 over all N
(:mod:`msa.training.parallel`, docs/context_parallel.md); ``--batch-size``
is then the global batch, and the run trains on the batches of a
one-process run. ``--cp`` and N may change on ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

import msa
from msa.cli import arguments
from msa.fp8 import FP8_DTYPE, FP8_NAME
from msa.nn import MSAConfig, MSATransformer
from msa.training import RecipeConfig, Trainer
from msa.training.checkpoint import load_model
from msa.training.data import TokenBatches, corpus_texts, load_corpus, tokenize
from msa.training.parallel import Parallel
from msa.training.tokens import ByteTokenizer, Tokenizer, load_gguf_tokenizer, load_tokenizer, require_gguf

NEW_MODEL_DEFAULTS = dict(arch="msa", hidden=128, layers=2, heads=4, kv_heads=2)
MSA_DEFAULTS = dict(block_size=32, topk=4, warmup_steps=20)
# arguments that are not settings of the run: a resumed run may change them
SESSION_ARGUMENTS = ("out", "resume", "device", "max_seconds", "checkpoint_every_s", "cp", "run", "error")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def non_negative_float(text: str) -> float:
    """A finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A float in [0, 1]."""
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def add_parser(commands) -> None:
    parser = commands.add_parser("train", help="train an MSA model with the paper's recipe",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data and tokens")
    data.add_argument("--data", type=Path, default=None,
                      help="a text file, a directory of text files or a .npy of token ids (default: msa's .py files)")
    data.add_argument("--val-data", type=Path, default=None, help="held-out data (default: the last 5%% of --data)")
    data.add_argument("--warmup-data", type=Path, default=None,
                      help="the indexer warm-up's data (default: --data, on a seed stream of its own)")
    data.add_argument("--tokenizer", type=Path, default=None,
                      help="a tokenizer.json or tokenizer directory (default: --init's own; bytes for new models)")
    data.add_argument("--seq-len", type=arguments.positive_int, default=512)
    data.add_argument("--batch-size", type=arguments.positive_int, default=4,
                      help="sequences per update (under torchrun: in all, split over the data-parallel ranks)")
    data.add_argument("--needle-rate", type=fraction, default=0.0,
                      help="fraction of sequences with retrieval needles (byte tokens only)")
    data.add_argument("--eval-batches", type=arguments.positive_int, default=4)
    model = parser.add_argument_group("model")
    model.add_argument("--init", type=Path, default=None,
                       help="a checkpoint to start from: a Hugging Face or msa train model directory, or a .gguf file")
    model.add_argument("--arch", choices=["msa", "llama"], default=None, help="a new model's kind (default: msa)")
    model.add_argument("--dense", action="store_true", help="no MSA: the dense baseline (Hugging Face models)")
    for name, help_text in (("hidden", "hidden size"), ("layers", "decoder layers"),
                            ("heads", "query heads (a multiple of --kv-heads)"), ("kv-heads", "KV heads")):
        model.add_argument(f"--{name}", type=arguments.positive_int, default=None,
                           help=f"a new model's {help_text} (default: {NEW_MODEL_DEFAULTS[name.replace('-', '_')]})")
    model.add_argument("--block-size", type=arguments.power_of_two, default=None,
                       help=f"MSA key block size (default: {MSA_DEFAULTS['block_size']}; an MSA --init keeps its own)")
    model.add_argument("--topk", type=arguments.positive_int, default=None,
                       help=f"blocks per query and KV group (default: {MSA_DEFAULTS['topk']})")
    model.add_argument("--kl-topk", type=arguments.positive_int, default=None,
                       help="the KL loss's support: the top KL_TOPK blocks, >= --topk (default: the selected ones)")
    model.add_argument("--fp8-index", action="store_true", help="rank blocks with FP8 index vectors (msa.fp8)")
    recipe = parser.add_argument_group("recipe (msa.training.RecipeConfig)")
    recipe.add_argument("--steps", type=arguments.non_negative_int, default=60,
                        help="LM updates (the same for --dense and MSA runs; 0: a warm-up-only run, the training-free "
                             "conversion)")
    recipe.add_argument("--warmup-steps", type=arguments.non_negative_int, default=None,
                        help=f"indexer warm-up updates before them (default: {MSA_DEFAULTS['warmup_steps']}; "
                             "MSA only)")
    recipe.add_argument("--kl-weight", type=non_negative_float, default=RecipeConfig.kl_weight)
    recipe.add_argument("--lr", type=arguments.positive_float, default=RecipeConfig.lr)
    recipe.add_argument("--index-lr", type=arguments.positive_float, default=RecipeConfig.index_lr,
                        help="the Index Branch's learning rate (constant in the warm-up)")
    recipe.add_argument("--lr-warmup-steps", type=arguments.non_negative_int, default=RecipeConfig.lr_warmup_steps,
                        help="linear learning-rate ramp over the first LM updates")
    recipe.add_argument("--min-lr-ratio", type=fraction, default=RecipeConfig.min_lr_ratio,
                        help="the cosine's final learning rate, relative to --lr")
    recipe.add_argument("--weight-decay", type=non_negative_float, default=RecipeConfig.weight_decay)
    recipe.add_argument("--grad-clip", type=arguments.positive_float, default=RecipeConfig.grad_clip)
    recipe.add_argument("--eval-every", type=arguments.positive_int, default=20, help="updates between evaluations")
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--out", type=Path, default=Path("runs/train"))
    run_group.add_argument("--resume", action="store_true",
                           help="continue the run in --out (same settings; starts one if --out has none)")
    run_group.add_argument("--device", type=arguments.device, default=None,
                           help="cpu, cuda, cuda:N (default: cuda when available)")
    run_group.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                           help="the master weights' dtype (default: float32, under bf16 autocast on CUDA; "
                                "float64: exactness checks)")
    run_group.add_argument("--cp", type=arguments.positive_int, default=1,
                           help="context-parallel size under torchrun: each sequence split over CP processes, the "
                                "batch over the (processes / CP) data-parallel ranks (docs/context_parallel.md)")
    run_group.add_argument("--seed", type=arguments.non_negative_int, default=0)
    run_group.add_argument("--checkpoint-every-s", type=non_negative_float, default=RecipeConfig.checkpoint_every_s)
    run_group.add_argument("--max-seconds", type=arguments.positive_float, default=None,
                           help="stop after a checkpoint once this much time has passed (continue with --resume)")
    parser.set_defaults(run=run, error=parser.error)


# ---------------------------------------------------------------------- checks and settings

def _check_arguments(args) -> None:
    """What the argument types cannot see: combinations. Fills in the defaults that depend on them."""
    new_model_options = [name for name in NEW_MODEL_DEFAULTS if getattr(args, name) is not None]
    if args.init is not None and new_model_options:
        args.error(f"--{new_model_options[0].replace('_', '-')} sets up a new model; --init loads one")
    msa_options = [name for name in ("block_size", "topk", "kl_topk") if getattr(args, name) is not None]
    msa_options += ["fp8_index"] if args.fp8_index else []
    if args.dense:
        if args.init is None and args.arch in (None, "msa"):
            args.error("--dense needs --arch llama or --init (an MSATransformer is always MSA)")
        if msa_options or args.warmup_steps:
            given = msa_options[0] if msa_options else "warmup_steps"
            args.error(f"--{given.replace('_', '-')} is an MSA setting; --dense trains without MSA")
    if args.init is None:
        for name, value in NEW_MODEL_DEFAULTS.items():
            setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
        if args.heads % args.kv_heads:
            args.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
        if args.hidden % args.heads or (args.hidden // args.heads) % 2:
            args.error(f"--hidden ({args.hidden}) must be --heads ({args.heads}) times an even head size")
    if args.warmup_steps is None:
        args.warmup_steps = 0 if args.dense else MSA_DEFAULTS["warmup_steps"]
    if args.steps == 0 and args.warmup_steps == 0:
        args.error("--steps 0 trains nothing without --warmup-steps (a warm-up-only run needs warm-up steps)")
    topk = args.topk if args.topk is not None else MSA_DEFAULTS["topk"]
    if args.kl_topk is not None and args.kl_topk < topk:
        args.error(f"--kl-topk ({args.kl_topk}) must be >= --topk ({topk})")
    for name in ("data", "val_data", "warmup_data", "tokenizer", "init"):
        path = getattr(args, name)
        if path is not None and not path.exists():
            args.error(f"--{name.replace('_', '-')}: {path} does not exist")
    if args.init is not None and args.init.is_file() and args.init.suffix != ".gguf":
        args.error(f"--init: expected a model directory or a .gguf file, got {args.init}")


def _settings(args) -> dict:
    """The run's settings, as stored in run.json: every argument but the per-session ones."""
    settings = {}
    for name, value in sorted(vars(args).items()):
        if name not in SESSION_ARGUMENTS:
            settings[name] = str(value.resolve()) if isinstance(value, Path) else value
    return settings


def _check_out(args, settings: dict) -> None:
    """Refuse to start over a run in --out, or to resume one with other settings."""
    out = args.out
    if out.exists() and not out.is_dir():
        args.error(f"--out: {out} is a file, not a directory")
    run_file = out / "run.json"
    has_run = any((out / name).exists() for name in ("run.json", "log.jsonl", "checkpoint", "checkpoint.old",
                                                     "checkpoint.pt"))
    if has_run and not args.resume:
        args.error(f"--out {out} exists with a run; pass --resume to continue it or choose another --out")
    if not has_run:
        return
    if not run_file.exists():
        args.error(f"--out {out} holds a run without run.json (an older msa train); it cannot be resumed: choose "
                   "another --out")
    saved = json.loads(run_file.read_text())
    differing = [f"--{name.replace('_', '-')} {saved.get(name)!r} there, {settings.get(name)!r} now"
                 for name in sorted(set(saved) | set(settings)) if saved.get(name) != settings.get(name)]
    if differing:
        args.error(f"--resume: the run in {out} has other settings: " + "; ".join(differing))


# ---------------------------------------------------------------------- model and tokens

def _new_model(args, vocab_size: int) -> torch.nn.Module:
    head_dim = args.hidden // args.heads
    if args.arch == "msa":
        config = MSAConfig(vocab_size=vocab_size, hidden_size=args.hidden, num_layers=args.layers,
                           num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=head_dim,
                           intermediate_size=3 * args.hidden, index_head_dim=head_dim,
                           block_size=args.block_size or MSA_DEFAULTS["block_size"],
                           topk=args.topk or MSA_DEFAULTS["topk"], kl_topk=args.kl_topk,
                           index_dtype=FP8_NAME if args.fp8_index else None)
        return MSATransformer(config)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq_len, 4096),
                         rope_theta=500000.0)
    return LlamaForCausalLM(config)


def _load_init(args, device: torch.device) -> tuple[torch.nn.Module, Tokenizer | None]:
    """``--init``'s model in ``--dtype`` (float32 by default: the master weights; CUDA runs compute under bf16
    autocast) and its own tokenizer (None if it has none)."""
    dtype = DTYPES[args.dtype or "float32"]
    if args.init.suffix != ".gguf":
        return load_model(args.init, device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM

    require_gguf(args.init)
    model = AutoModelForCausalLM.from_pretrained(args.init.parent, gguf_file=args.init.name, dtype=dtype,
                                                 local_files_only=True)
    # transformers dequantizes the GGUF weights into float layers but leaves the model marked as quantized,
    # which save_pretrained refuses: unmark it, once sure that no weight stayed packed
    if any(not p.is_floating_point() for p in model.parameters()):
        raise ValueError(f"{args.init}: some weights stay quantized after loading; training needs float weights")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model.to(device), load_gguf_tokenizer(args.init)


def _is_msa(model: torch.nn.Module) -> bool:
    if isinstance(model, MSATransformer):
        return True
    from msa.integrations import hf

    return bool(hf.msa_layers(model))


def _vocab_rows(model: torch.nn.Module) -> int:
    embedding = model.embed if isinstance(model, MSATransformer) else model.get_input_embeddings()
    return embedding.num_embeddings


def _model_and_tokenizer(args, device: torch.device) -> tuple[torch.nn.Module, Tokenizer]:
    tokenizer = None
    if args.tokenizer is not None:
        try:
            tokenizer = load_tokenizer(args.tokenizer)
        except ValueError as error:
            args.error(f"--tokenizer: {error}")
    if args.init is None:
        tokenizer = tokenizer or ByteTokenizer()
        model = _new_model(args, tokenizer.vocab_size).to(device=device, dtype=DTYPES[args.dtype or "float32"])
    else:
        try:
            model, own_tokenizer = _load_init(args, device)
        except ValueError as error:
            args.error(f"--init: {error}")
        tokenizer = tokenizer or own_tokenizer
        if tokenizer is None:
            args.error(f"--init {args.init} has no tokenizer beside it (tokenizer.json, tokenizer_config.json, "
                       "tokenizer.model); pass --tokenizer")
        rows = _vocab_rows(model)
        # special tokens past the rows are tolerated (transformers adds some, e.g. to GGUF tokenizers); the
        # corpus' ids are checked against the rows when it is loaded
        if any(i not in tokenizer.special_ids for i in range(rows, tokenizer.vocab_size)):
            args.error(f"the tokenizer ({tokenizer}) has {tokenizer.vocab_size} tokens, more than the {rows} "
                       f"embedding rows of --init {args.init}")
        if _is_msa(model):
            if args.dense:
                args.error(f"--init {args.init} holds an MSA model; --dense needs a dense one")
            given = [name for name in ("block_size", "topk", "kl_topk") if getattr(args, name) is not None]
            if given or args.fp8_index:
                option = given[0].replace("_", "-") if given else "fp8-index"
                args.error(f"--{option}: --init {args.init} is MSA already and keeps its own MSA settings")
    if not args.dense and not _is_msa(model):
        from msa.integrations import hf

        hf.convert(model, block_size=args.block_size or MSA_DEFAULTS["block_size"],
                   topk=args.topk or MSA_DEFAULTS["topk"], kl_topk=args.kl_topk,
                   index_dtype=FP8_DTYPE if args.fp8_index else None)
    return model, tokenizer


# ---------------------------------------------------------------------- data

def _corpus(args, option: str, path: Path | None, tokenizer: Tokenizer, vocab_rows: int) -> np.ndarray:
    """The tokens of ``path`` (None: this package's source code), every id below the model's ``vocab_rows``."""
    try:
        if path is None:
            tokens = tokenize(corpus_texts(Path(msa.__file__).parent, suffix=".py"), tokenizer)
        else:
            tokens = load_corpus(path, tokenizer)
    except ValueError as error:
        args.error(f"{option}: {error}")
    if len(tokens) and int(tokens.max()) >= vocab_rows:
        args.error(f"{option}: token id {int(tokens.max())} is past the model's {vocab_rows} embedding rows")
    return tokens


def _batches(args, what: str, tokens, stream: str) -> TokenBatches:
    if len(tokens) <= args.seq_len:
        args.error(f"{what} has {len(tokens)} tokens: --seq-len {args.seq_len} needs more")
    return TokenBatches(tokens, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed, stream=stream,
                        needle_rate=args.needle_rate)


# ---------------------------------------------------------------------- run

def run(args) -> int:
    _check_arguments(args)
    settings = _settings(args)
    _check_out(args, settings)
    try:
        parallel = Parallel.start(args.cp, args.device, args.batch_size, args.seq_len)
    except ValueError as error:
        args.error(str(error))
    if parallel is not None:
        device = parallel.device
    else:
        device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)  # the same initialization on every rank
    model, tokenizer = _model_and_tokenizer(args, device)
    if parallel is not None and not isinstance(model, MSATransformer):
        args.error("under torchrun msa train trains MSATransformer models only (--arch msa, or an --init msa train "
                   f"wrote); this one is {type(model).__name__}")
    if args.needle_rate and not isinstance(tokenizer, ByteTokenizer):
        args.error(f"--needle-rate: needles are byte strings and need byte tokens, not {tokenizer}")

    rows = _vocab_rows(model)
    data = _corpus(args, "--data", args.data, tokenizer, rows)
    if args.val_data is not None:
        train, val = data, _corpus(args, "--val-data", args.val_data, tokenizer, rows)
    else:
        split = int(0.95 * len(data))
        train, val = data[:split], data[split:]
    data_name = "--data" if args.data is not None else "the default corpus"
    train_batches = _batches(args, data_name if args.val_data else f"{data_name} (its first 95%)", train, "train")
    val_source = _batches(args, "--val-data" if args.val_data else f"{data_name} (its last 5%)", val, "eval")
    warmup_batches = None
    if args.warmup_steps:
        warmup = train if args.warmup_data is None else _corpus(args, "--warmup-data", args.warmup_data, tokenizer,
                                                                rows)
        warmup_batches = _batches(args, "--warmup-data" if args.warmup_data else data_name, warmup, "warmup")

    recipe = RecipeConfig(steps=args.steps, warmup_steps=args.warmup_steps, kl_weight=args.kl_weight, lr=args.lr,
                          index_lr=args.index_lr, lr_warmup_steps=args.lr_warmup_steps,
                          min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                          eval_every=args.eval_every, checkpoint_every_s=args.checkpoint_every_s,
                          max_seconds=args.max_seconds, bf16=args.dtype in (None, "float32"))
    trainer = Trainer(model, recipe, train_batches, [val_source(i) for i in range(args.eval_batches)], args.out,
                      warmup_batches=warmup_batches, tokenizer=tokenizer, resume=args.resume, parallel=parallel)
    run_file = args.out / "run.json"
    if trainer.is_main and not run_file.exists():
        args.out.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(settings, indent=2) + "\n")
    log = trainer.run()
    if trainer.finished:
        trainer.save_model(args.out / "model")
    if parallel is not None:
        parallel.close()
    if not trainer.is_main:
        return 0
    if not trainer.finished:
        print(f"stopped after {trainer.step} of {trainer.total_steps} updates (--max-seconds); continue with "
              f"--resume --out {args.out}")
        return 0
    print(json.dumps(log[-1]))
    print(f"model saved to {args.out / 'model'} (msa generate --model {args.out / 'model'})")
    return 0
