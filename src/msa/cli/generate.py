"""``msa generate``: prefill a prompt, decode greedily, and check the result against a recompute.

Without ``--model``: a small :class:`msa.nn.MSATransformer` with random
weights (seeded) and a random prompt of ``--prompt-len`` tokens.
With ``--model DIR``: the model ``msa train`` saved there (``OUT/model`` or
``OUT/checkpoint``), or any Hugging Face directory (dense, or MSA after
``msa.integrations.hf.convert`` and ``save_pretrained``); the prompt is
``--prompt`` / ``--prompt-file`` text, encoded by the tokenizer saved beside
the model, or ``--prompt-len`` random tokens.

An :class:`MSATransformer` runs on :class:`msa.inference.Generator` (chunked
prefill into the paged KV cache, one-token decode steps, CUDA graphs on a
GPU); its logits are compared with a recompute of the whole sequence in one
pass. The same model then runs with dense attention over a contiguous KV
cache (``Generator(dense=True)``, no CUDA graphs), checked the same way: the
baseline its decode speed is quoted against. A Hugging Face model runs
``model.generate`` (greedy); its tokens are compared with greedy decoding by
full forward passes, and its logits with theirs. The continuation is printed as text when there is a tokenizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from msa.cli import arguments
from msa.cli.bench import DTYPES
from msa.fp8 import FP8_NAME
from msa.inference.generate import Generator
from msa.nn import MSAConfig, MSATransformer
from msa.training.checkpoint import load_model

CPU_DEFAULTS = dict(prompt_len=2000, chunk_size=512, dtype="float32",
                    model=MSAConfig(vocab_size=512, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2,
                                    head_dim=32, intermediate_size=512, index_head_dim=32, block_size=64, topk=4))
GPU_DEFAULTS = dict(prompt_len=32768, chunk_size=8192, dtype="bfloat16",
                    model=MSAConfig(vocab_size=32000, hidden_size=1024, num_layers=4, num_heads=16, num_kv_heads=4,
                                    head_dim=64, intermediate_size=2816, index_head_dim=64, block_size=128, topk=16))


def add_parser(commands) -> None:
    parser = commands.add_parser("generate", help="prefill + greedy decode, checked against a recompute",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help="a model directory (msa train's OUT/model, or Hugging Face); default: a random model")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="prompt text (needs --model with a tokenizer)")
    prompt.add_argument("--prompt-file", type=Path, default=None, help="a UTF-8 file holding the prompt text")
    parser.add_argument("--prompt-len", type=arguments.positive_int, default=None,
                        help="random prompt tokens, without --prompt (default: 2000 on a CPU, 32768 on CUDA)")
    parser.add_argument("--new-tokens", type=arguments.positive_int, default=32)
    parser.add_argument("--device", type=arguments.device, default=None,
                        help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: float32 on a CPU, bfloat16 on CUDA")
    parser.add_argument("--chunk-size", type=arguments.positive_int, default=None,
                        help="prefill chunk in tokens (MSATransformer models; default: 512 on a CPU, 8192 on CUDA)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="decode without CUDA graphs (MSATransformer)")
    parser.add_argument("--fp8-index", action="store_true",
                        help="the random model ranks blocks with FP8 index vectors and keeps the cache's index keys "
                             "in FP8 (msa.fp8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.set_defaults(run=run, error=parser.error)


def _check_arguments(args) -> None:
    if args.model is None:
        given = "--prompt" if args.prompt is not None else "--prompt-file" if args.prompt_file is not None else None
        if given:
            args.error(f"{given} needs --model (a model with a tokenizer); the random model takes --prompt-len")
    else:
        if args.fp8_index:
            args.error(f"--fp8-index sets up the random model; --model {args.model} has its own settings")
        if (args.prompt is not None or args.prompt_file is not None) and args.prompt_len is not None:
            args.error("--prompt-len sets a random prompt's length; leave it out with --prompt or --prompt-file")
    if args.prompt_file is not None and not args.prompt_file.is_file():
        args.error(f"--prompt-file: {args.prompt_file} is not a file")
    if args.json is not None and args.json.is_dir():
        args.error(f"--json must name a file, got the directory {str(args.json)!r}")


def _prompt(args, tokenizer, vocab_size: int, default_len: int) -> list[int]:
    """The prompt's token ids: the encoded text of --prompt / --prompt-file, else random tokens."""
    if args.prompt is None and args.prompt_file is None:
        return torch.randint(0, vocab_size, (args.prompt_len or default_len,)).tolist()
    option = "--prompt" if args.prompt is not None else "--prompt-file"
    if tokenizer is None:
        args.error(f"{option}: --model {args.model} has no tokenizer beside it to encode the text; use --prompt-len")
    if args.prompt is not None:
        text = args.prompt
    else:
        try:
            text = args.prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            args.error(f"--prompt-file: {args.prompt_file} is not UTF-8 text")
    prompt = tokenizer.encode([text])[0].tolist()
    if not prompt:
        args.error(f"{option}: the text encodes to no tokens")
    return prompt


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _serve(model: MSATransformer, prompt: list[int], new_tokens: int, chunk_size: int, cuda_graphs: bool | None,
           dense: bool, device: torch.device) -> dict:
    """Prefill + greedy decode on a :class:`Generator`, timed; its logits compared with a one-pass recompute of the
    model (in dense mode for ``dense``)."""
    prompt_len = len(prompt)
    generator = Generator(model, max_seq_len=prompt_len + new_tokens, chunk_size=chunk_size, cuda_graphs=cuda_graphs,
                          dense=dense)
    warm_up = generator.add_request()  # compiles the kernels outside the timings
    generator.prefill(warm_up, prompt[:chunk_size])
    generator.free(warm_up)
    request = generator.add_request()
    _synchronize(device)
    start = time.perf_counter()
    logits = [generator.prefill(request, prompt)]
    _synchronize(device)
    prefill_s = time.perf_counter() - start
    tokens = [int(logits[0].argmax())]
    decode_times = []
    while len(tokens) < new_tokens:
        start = time.perf_counter()
        logits.append(generator.step([request], [[tokens[-1]]])[-1])
        tokens.append(int(logits[-1].argmax()))  # reads the logits: waits for the step
        decode_times.append(time.perf_counter() - start)
    generator.free(request)
    logits = torch.stack(logits).float()

    mode = model.config.mode
    model.set_mode("dense" if dense else "sparse")
    try:
        with torch.no_grad():
            full = torch.tensor(prompt + tokens[:-1], device=device)[None]
            reference = model(full, compute_kl_loss=False)[0][0, prompt_len - 1:].float()
    finally:
        model.set_mode(mode)
    # steady-state decode: skip the first steps (kernel compilation, graph capture)
    steady = sorted(decode_times[2:] or decode_times or [float("nan")])
    return dict(cuda_graphs=generator.cuda_graphs, prefill_s=prefill_s,
                decode_ms_per_token=1e3 * steady[len(steady) // 2],
                logits_rel_err=((logits - reference).norm() / reference.norm()).item(),
                same_argmax=(logits.argmax(-1) == reference.argmax(-1)).double().mean().item(), tokens=tokens)


def _generate_paged(model: MSATransformer, prompt: list[int], new_tokens: int, chunk_size: int,
                    cuda_graphs: bool | None, device: torch.device, console: Console) -> dict:
    """MSA over the paged KV cache, then the same model with dense attention over a contiguous cache (the
    baseline), each checked against its recompute."""
    with console.status(f"MSA: prefill {len(prompt)} tokens + decode {new_tokens}"):
        result = _serve(model, prompt, new_tokens, chunk_size, cuda_graphs, False, device)
    with console.status(f"dense baseline: prefill {len(prompt)} tokens + decode {new_tokens}"):
        dense = _serve(model, prompt, new_tokens, chunk_size, False, True, device)
    return dict(model=model.config.to_dict(), chunk_size=chunk_size, **result,
                dense={key: value for key, value in dense.items() if key != "cuda_graphs"})


def _generate_hf(model, prompt: list[int], new_tokens: int, device: torch.device, console: Console) -> dict:
    """``model.generate`` (greedy), timed; its tokens checked against greedy decoding by full forward passes.

    One forward over ``prompt + tokens[:-1]`` gives the logits a full forward of every prefix would (the model is
    causal): greedy decoding by full forwards agrees with ``generate`` up to the first position whose argmax
    differs from the generated token.
    """
    input_ids = torch.tensor([prompt], device=device)
    with console.status(f"generate: {len(prompt)} prompt tokens + {new_tokens}"), torch.no_grad():
        _synchronize(device)
        start = time.perf_counter()
        output = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
        _synchronize(device)
        generate_s = time.perf_counter() - start
    tokens = output.sequences[0, len(prompt):].tolist()
    logits = torch.stack(output.logits)[:, 0].float()  # [new_tokens, vocab]
    with console.status("greedy decoding by full forward passes"), torch.no_grad():
        reference = model(output.sequences[:, :-1]).logits[0, len(prompt) - 1:].float()
    greedy = reference.argmax(-1).tolist()
    first_difference = next((i for i, (a, b) in enumerate(zip(tokens, greedy)) if a != b), None)
    msa_settings = getattr(model.config, "msa", None)
    return dict(model=dict(type=type(model).__name__, msa=msa_settings), generate_s=generate_s,
                ms_per_token=1e3 * generate_s / new_tokens,
                logits_rel_err=((logits - reference).norm() / reference.norm()).item(),
                same_argmax=(logits.argmax(-1) == reference.argmax(-1)).double().mean().item(),
                greedy_first_difference=first_difference, tokens=tokens)


def run(args) -> int:
    _check_arguments(args)
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    dtype = DTYPES[args.dtype or defaults["dtype"]]
    torch.manual_seed(args.seed)
    tokenizer = None
    if args.model is None:
        config = dataclasses.replace(defaults["model"], index_dtype=FP8_NAME if args.fp8_index else None)
        model = MSATransformer(config).to(device=device, dtype=dtype)
    else:
        try:
            model, tokenizer = load_model(args.model, device=device, dtype=dtype)
        except ValueError as error:
            args.error(f"--model: {error}")
    model.eval()
    is_paged = isinstance(model, MSATransformer)
    if not is_paged and (args.chunk_size is not None or args.no_cuda_graphs):
        option = "--chunk-size" if args.chunk_size is not None else "--no-cuda-graphs"
        args.error(f"{option} sets up msa.inference.Generator (MSATransformer models); --model {args.model} is a "
                   f"Hugging Face model ({type(model).__name__}), which runs model.generate")
    vocab_size = tokenizer.vocab_size if tokenizer is not None else (
        model.config.vocab_size if is_paged else model.get_input_embeddings().num_embeddings)
    prompt = _prompt(args, tokenizer, vocab_size, defaults["prompt_len"])
    max_positions = None if is_paged else getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and len(prompt) + args.new_tokens > max_positions:
        args.error(f"the prompt ({len(prompt)} tokens) + --new-tokens {args.new_tokens} exceed the model's "
                   f"{max_positions} positions")
    console = Console()
    if is_paged:
        result = _generate_paged(model, prompt, args.new_tokens, args.chunk_size or defaults["chunk_size"],
                                 False if args.no_cuda_graphs else None, device, console)
    else:
        result = _generate_hf(model, prompt, args.new_tokens, device, console)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).removeprefix("torch."), "model_dir": None if args.model is None else str(args.model),
              "prompt_len": len(prompt), "new_tokens": args.new_tokens, **result}

    if is_paged:
        config = model.config
        index = ", FP8 index" if config.index_dtype else ""
        table = Table(title=f"msa generate ({result['device']}, {result['dtype']}{index}, {config.num_layers} layers, "
                            f"block {config.block_size} x topk {config.topk})")
        for column in ("attention", "prompt", "prefill s", "decode ms/token", "logits rel err vs recompute",
                       "same argmax"):
            table.add_column(column, justify="right")
        graphs = ", CUDA graphs" if result["cuda_graphs"] else ""
        for name, row in ((f"MSA, paged cache{graphs}", result), ("dense, contiguous cache", result["dense"])):
            table.add_row(name, str(len(prompt)), f"{row['prefill_s']:.2f}", f"{row['decode_ms_per_token']:.2f}",
                          f"{row['logits_rel_err']:.1e}", f"{100 * row['same_argmax']:.0f}%")
        table.caption = (f"decode: MSA {result['dense']['decode_ms_per_token'] / result['decode_ms_per_token']:.2f}x "
                         "the speed of dense")
    else:
        table = Table(title=f"msa generate ({result['device']}, {result['dtype']}, {type(model).__name__}, "
                            "model.generate)")
        for column in ("prompt", "generate s", "ms/token", "logits rel err vs recompute", "greedy recompute"):
            table.add_column(column, justify="right")
        difference = result["greedy_first_difference"]
        table.add_row(str(len(prompt)), f"{result['generate_s']:.2f}", f"{result['ms_per_token']:.2f}",
                      f"{result['logits_rel_err']:.1e}",
                      "same tokens" if difference is None else f"differs at token {difference}")
    console.print(table)
    if tokenizer is not None:
        result["text"] = tokenizer.decode(result["tokens"])
        console.print("continuation:", style="bold")
        console.print(result["text"], markup=False, highlight=False)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for name, row in (("generated", result), ("dense baseline", result.get("dense"))):
        if row is not None and row["logits_rel_err"] > tolerance:
            console.print(f"[red]{name} logits differ from the recompute: {row['logits_rel_err']:.1e} > "
                          f"{tolerance:.0e}[/red]")
            return 1
    if not is_paged and result["greedy_first_difference"] is not None:
        console.print(f"[red]model.generate differs from greedy decoding by full forwards at token "
                      f"{result['greedy_first_difference']}[/red]")
        return 1
    return 0
