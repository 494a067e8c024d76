"""Model-agnostic evaluation helpers for the SmolLM2 study (PROTOCOL.md gives the definitions).

A model is a function ``logits_fn(ids)``: int64 ``[1, S]`` -> logits ``[1, S, V]``. Tensors for
the selection diagnostics follow the ``msa`` layouts of one sequence: ``q`` ``[S, Hq, D]``,
``k`` ``[S, G, D]``, ``block_indices`` ``[S, G, topk]`` (int, -1 pads; query head ``h`` belongs to
group ``h // (Hq // G)``).

- ``window_nll`` / ``bucket_means`` / ``loss_by_bucket``: held-out loss by position bucket.
- ``paired_bootstrap_gap``: relative loss gap (%) of a model against a reference, paired over windows.
- ``retrieval_accuracy`` / ``retrieval_compare``: RULER accuracy per task / length / depth and the
  paired difference (points) against a reference.
- ``attention_recall``, ``local_blocks``, ``random_blocks``, ``oracle_blocks``, ``summarize_recall``:
  index diagnostics and the eval-only selectors.
- ``needle_hits``: needle-block selection against its chance rate.
- ``keys_read``: keys read per query by a selection.
- ``run_dir`` / ``write_json``: one new folder per run; JSON never overwritten.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

BUCKETS: tuple[tuple[int, int], ...] = ((0, 512), (512, 2048), (2048, 4096), (4096, 8192))
BUCKET_NAMES = tuple(f"[{a},{b})" for a, b in BUCKETS)
N_RESAMPLES = 10_000
BOOTSTRAP_SEED = 20_261_204


# --------------------------------------------------------------------------- held-out loss


@torch.no_grad()
def token_nll(logits_fn: Callable, window, *, device=None) -> np.ndarray:
    """Per-token NLL (nats) of one window: entry ``p`` is ``-log P(x[p+1] | x[0..p])``, the loss of the
    query at position ``p``; float64 ``[S - 1]``."""
    ids = torch.as_tensor(np.asarray(window), dtype=torch.long, device=device)[None]
    logits = logits_fn(ids)[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    return nll.double().cpu().numpy()


def window_nll(logits_fn: Callable, windows, *, device=None, progress: bool = False) -> np.ndarray:
    """``[n, S - 1]`` per-token NLL of every window (float64)."""
    windows = np.asarray(windows)
    rows = []
    if progress:
        from rich.progress import Progress

        with Progress() as bar:
            task = bar.add_task("held-out loss", total=len(windows))
            for w in windows:
                rows.append(token_nll(logits_fn, w, device=device))
                bar.advance(task)
    else:
        rows = [token_nll(logits_fn, w, device=device) for w in windows]
    return np.stack(rows)


def bucket_means(nll: np.ndarray, buckets: Sequence[tuple[int, int]] = BUCKETS) -> np.ndarray:
    """Mean NLL per window and position bucket: ``[n, len(buckets)]``. Bucket ``[a, b)`` holds the
    queries at positions ``a .. b - 1`` (those predicting tokens ``a + 1 .. b``); positions past the
    window are dropped (with 8192-token windows the last bucket has 4,095 queries)."""
    nll = np.asarray(nll, dtype=np.float64)
    out = np.empty((nll.shape[0], len(buckets)))
    for j, (a, b) in enumerate(buckets):
        part = nll[:, a: min(b, nll.shape[1])]
        if part.shape[1] == 0:
            raise ValueError(f"bucket [{a},{b}) is empty for windows of {nll.shape[1] + 1} tokens")
        out[:, j] = part.mean(axis=1)
    return out


def loss_by_bucket(per_window: np.ndarray, domains: Sequence[str],
                   bucket_names: Sequence[str] = BUCKET_NAMES) -> dict:
    """``{domain: {bucket: mean loss}}`` for every domain and ``"all"`` (windows weighted equally;
    every window has the same number of queries in a bucket, so this is also the token mean)."""
    per_window = np.asarray(per_window)
    domains = np.asarray(domains)
    out = {}
    for name in [*sorted(set(domains.tolist())), "all"]:
        rows = per_window if name == "all" else per_window[domains == name]
        out[name] = {b: float(rows[:, j].mean()) for j, b in enumerate(bucket_names)}
    return out


# --------------------------------------------------------------------------- bootstrap


def _as_seeds(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"expected [n] or [seeds, n], got shape {x.shape}")
    return x


def _resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def paired_bootstrap_gap(reference, model, *, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                         ci: float = 0.95) -> dict:
    """Relative gap in % of ``model`` against ``reference``: ``100 * (mean(model) / mean(reference) - 1)``.

    ``reference``/``model``: per-window values ``[n]`` (one seed) or ``[seeds, n]`` (the same ``n``
    windows for every seed). The statistic is the mean over seeds of each seed's gap; the bootstrap
    resamples windows (the same draw for both models and all seeds: paired), ``n_resamples`` times,
    and reports the percentile interval. Also returns each seed's gap and the worst seed's."""
    ref, new = _as_seeds(reference), _as_seeds(model)
    if ref.shape != new.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {new.shape}")
    per_seed = 100.0 * (new.mean(1) / ref.mean(1) - 1.0)
    idx = _resample_indices(ref.shape[1], n_resamples, seed)
    boot = (100.0 * (new[:, idx].mean(-1) / ref[:, idx].mean(-1) - 1.0)).mean(0)  # [n_resamples]
    lo, hi = np.quantile(boot, [(1 - ci) / 2, (1 + ci) / 2])
    return {"gap_pct": float(per_seed.mean()), "lo": float(lo), "hi": float(hi),
            "per_seed": [float(g) for g in per_seed], "worst_seed": float(per_seed.max()),
            "n": int(ref.shape[1]), "seeds": int(ref.shape[0]), "n_resamples": n_resamples, "ci": ci}


def paired_bootstrap_diff(reference, model, *, scale: float = 100.0, n_resamples: int = N_RESAMPLES,
                          seed: int = BOOTSTRAP_SEED, ci: float = 0.95) -> dict:
    """Difference of means ``scale * (mean(model) - mean(reference))`` (points for 0/1 outcomes), paired
    over items (resampled jointly for both models and all seeds), with the percentile interval."""
    ref, new = _as_seeds(reference), _as_seeds(model)
    if ref.shape != new.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {new.shape}")
    diff = new - ref  # [seeds, n]
    per_seed = scale * diff.mean(1)
    item = diff.mean(0)  # the mean over seeds per item
    idx = _resample_indices(len(item), n_resamples, seed)
    boot = scale * item[idx].mean(-1)
    lo, hi = np.quantile(boot, [(1 - ci) / 2, (1 + ci) / 2])
    return {"diff": float(per_seed.mean()), "lo": float(lo), "hi": float(hi),
            "per_seed": [float(d) for d in per_seed], "reference": float(scale * ref.mean()),
            "model": float(scale * new.mean()), "n": int(ref.shape[1]), "seeds": int(ref.shape[0]),
            "n_resamples": n_resamples, "ci": ci}


def loss_gaps(reference_windows, model_windows, domains: Sequence[str],
              bucket_names: Sequence[str] = BUCKET_NAMES, **kwargs) -> dict:
    """``paired_bootstrap_gap`` per domain (and ``"all"``) and bucket from per-window bucket means
    ``[n, B]`` or ``[seeds, n, B]``."""
    ref, new = np.asarray(reference_windows, dtype=np.float64), np.asarray(model_windows, dtype=np.float64)
    if ref.ndim == 2:
        ref, new = ref[None], new[None]
    domains = np.asarray(domains)
    out = {}
    for name in [*sorted(set(domains.tolist())), "all"]:
        mask = np.ones(len(domains), bool) if name == "all" else domains == name
        out[name] = {b: paired_bootstrap_gap(ref[:, mask, j], new[:, mask, j], **kwargs)
                     for j, b in enumerate(bucket_names)}
    return out


# --------------------------------------------------------------------------- retrieval


def _key(r: dict, by: Sequence[str]) -> str:
    return "/".join(str(r[k]) for k in by)


def retrieval_accuracy(results: Sequence[dict], by: Sequence[str] = ("task",)) -> dict:
    """Accuracy in % (``correct``) per group of ``by`` (keys of the per-sample results of
    ``ruler.score``), e.g. ``("task",)``, ``("task", "length")``, ``("task", "length", "depth")``."""
    groups: dict[str, list[bool]] = {}
    for r in results:
        groups.setdefault(_key(r, by), []).append(bool(r["correct"]))
    return {k: {"acc": 100.0 * float(np.mean(v)), "n": len(v)} for k, v in sorted(groups.items())}


def _aligned(results_per_seed: Sequence[Sequence[dict]], ids: list[int]) -> np.ndarray:
    out = np.empty((len(results_per_seed), len(ids)))
    for s, results in enumerate(results_per_seed):
        table = {r["id"]: float(r["correct"]) for r in results}
        missing = [i for i in ids if i not in table]
        if missing:
            raise ValueError(f"seed {s}: {len(missing)} samples missing (first: {missing[0]})")
        out[s] = [table[i] for i in ids]
    return out


def retrieval_compare(reference, model, *, by: Sequence[str] = ("task",), **kwargs) -> dict:
    """Paired difference in points (``model - reference``) per group, bootstrapped over samples.
    ``reference``/``model``: per-sample results of ``ruler.score`` (one seed) or a list of them (one per
    seed, on the same samples: the suite is the same for every model)."""
    if reference and isinstance(reference[0], dict):
        reference, model = [reference], [model]
    groups: dict[str, list[int]] = {}
    for r in reference[0]:
        groups.setdefault(_key(r, by), []).append(r["id"])
    return {k: paired_bootstrap_diff(_aligned(reference, ids), _aligned(model, ids), **kwargs)
            for k, ids in sorted(groups.items())}


# --------------------------------------------------------------------------- selectors and recall


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int]:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q [S, Hq, D] and k [S, G, D] expected, got {tuple(q.shape)} and {tuple(k.shape)}")
    seqlen, n_heads, dim = q.shape
    groups = k.shape[1]
    if n_heads % groups:
        raise ValueError(f"Hq={n_heads} is not a multiple of G={groups}")
    return seqlen, n_heads, groups, dim


def _group_block_mass(q, k, start, end, block_size, scale):
    """Group-mean dense causal attention probabilities of queries ``start..end-1`` summed per key block:
    float32 ``[C, G, n_blocks]`` (``n_blocks`` over keys ``0..end-1``)."""
    seqlen, n_heads, groups, _ = _check_qk(q, k)
    ratio = n_heads // groups
    qc = q[start:end].float().unflatten(1, (groups, ratio))  # [C, G, R, D]
    logits = scale * torch.einsum("cgrd,tgd->cgrt", qc, k[:end].float())
    pos = torch.arange(start, end, device=q.device)
    visible = torch.arange(end, device=q.device)[None, :] <= pos[:, None]
    logits = logits.masked_fill(~visible[:, None, None, :], -math.inf)
    probs = torch.softmax(logits, dim=-1).mean(2)  # [C, G, T]
    n_blocks = math.ceil(end / block_size)
    probs = torch.nn.functional.pad(probs, (0, n_blocks * block_size - end))
    return probs.unflatten(-1, (n_blocks, block_size)).sum(-1)


def _chunk(seqlen: int, chunk: int | None, heads: int) -> int:
    return chunk or max(1, min(seqlen, (1 << 26) // max(1, heads * seqlen)))


@torch.no_grad()
def attention_recall(q: torch.Tensor, k: torch.Tensor, block_indices: torch.Tensor, *, block_size: int,
                     softmax_scale: float | None = None, chunk: int | None = None) -> torch.Tensor:
    """Attention recall per (query, group): the sum over the selected blocks of the group-mean dense
    causal attention probability (the share of the dense attention mass the selection keeps).
    float32 ``[S, G]``; 1.0 wherever the selection covers every visible block."""
    seqlen, n_heads, groups, dim = _check_qk(q, k)
    if block_indices.shape[:2] != (seqlen, groups):
        raise ValueError(f"block_indices [S, G, topk] expected, got {tuple(block_indices.shape)}")
    scale = dim ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.empty(seqlen, groups, dtype=torch.float32, device=q.device)
    step = _chunk(seqlen, chunk, n_heads)
    for start in range(0, seqlen, step):
        end = min(seqlen, start + step)
        mass = _group_block_mass(q, k, start, end, block_size, scale)  # [C, G, nb]
        idx = block_indices[start:end].long()
        valid = (idx >= 0) & (idx < mass.shape[-1])
        picked = mass.gather(-1, idx.clamp(0, mass.shape[-1] - 1)) * valid
        # a block listed twice counts once
        dup = torch.zeros_like(valid)
        for j in range(1, idx.shape[-1]):
            dup[..., j] = (idx[..., j: j + 1] == idx[..., :j]).any(-1)
        out[start:end] = (picked * ~dup).sum(-1)
    return out


@torch.no_grad()
def oracle_blocks(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int,
                  softmax_scale: float | None = None, chunk: int | None = None) -> torch.Tensor:
    """Eval-only oracle selector: the local block plus the ``topk - 1`` earlier blocks with the largest
    group-mean dense attention mass. int32 ``[S, G, topk]``, local block first, -1 pads."""
    seqlen, n_heads, groups, dim = _check_qk(q, k)
    scale = dim ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.full((seqlen, groups, topk), -1, dtype=torch.int32, device=q.device)
    step = _chunk(seqlen, chunk, n_heads)
    for start in range(0, seqlen, step):
        end = min(seqlen, start + step)
        mass = _group_block_mass(q, k, start, end, block_size, scale)
        pos = torch.arange(start, end, device=q.device)
        n_visible = pos // block_size + 1
        blocks = torch.arange(mass.shape[-1], device=q.device)
        score = mass.masked_fill(blocks[None, None, :] >= n_visible[:, None, None], -math.inf)
        score.scatter_(-1, (pos // block_size)[:, None, None].expand(-1, groups, 1), math.inf)
        vals, top = score.topk(min(topk, mass.shape[-1]), dim=-1)
        out[start:end, :, : top.shape[-1]] = top.masked_fill(vals == -math.inf, -1).int()
    return out


def local_blocks(seqlen: int, groups: int, *, block_size: int, topk: int, device=None) -> torch.Tensor:
    """Eval-only local-window selector at the same key budget: the query's block and the ``topk - 1``
    blocks just before it. int32 ``[S, G, topk]``, local block first, -1 pads."""
    local = torch.arange(seqlen, device=device) // block_size
    blocks = local[:, None] - torch.arange(topk, device=device)[None, :]
    blocks = blocks.masked_fill(blocks < 0, -1).int()
    return blocks[:, None, :].expand(seqlen, groups, topk).contiguous()


def random_blocks(seqlen: int, groups: int, *, block_size: int, topk: int,
                  generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Eval-only random selector: the local block plus ``topk - 1`` distinct earlier blocks drawn
    uniformly per (query, group). int32 ``[S, G, topk]``, -1 pads. (Drawn on the CPU from
    ``generator``, so the draw is the same on every device.)"""
    local = torch.arange(seqlen) // block_size
    n_blocks = int(local[-1]) + 1 if seqlen else 0
    noise = torch.rand(seqlen, groups, max(n_blocks, 1), generator=generator)
    earlier = torch.arange(max(n_blocks, 1))[None, None, :] < local[:, None, None]
    noise = noise.masked_fill(~earlier, -1.0)
    vals, top = noise.topk(min(topk - 1, max(n_blocks, 1)), dim=-1)
    top = top.masked_fill(vals < 0, -1)
    out = torch.full((seqlen, groups, topk), -1, dtype=torch.int32)
    out[..., 0] = local[:, None]
    out[..., 1: 1 + top.shape[-1]] = top.int()
    return out.to(device)


def keys_read(block_indices: torch.Tensor, *, block_size: int) -> torch.Tensor:
    """Visible keys inside the selected blocks per (query, group): float32 ``[S, G]``
    (a dense model reads ``p + 1`` keys at position ``p``)."""
    seqlen = block_indices.shape[0]
    pos = torch.arange(seqlen, device=block_indices.device)[:, None, None]
    idx = block_indices.long()
    start = idx * block_size
    count = (torch.minimum(start + block_size, pos + 1) - start).clamp(min=0) * (idx >= 0)
    dup = torch.zeros_like(idx, dtype=torch.bool)
    for j in range(1, idx.shape[-1]):
        dup[..., j] = (idx[..., j: j + 1] == idx[..., :j]).any(-1)
    return (count * ~dup).sum(-1).float()


def summarize_recall(recall, *, block_size: int, topk: int,
                     position_edges: Sequence[int] = (0, 512, 1024, 2048, 3072, 4096, 5120, 6144, 7168, 8192)) -> dict:
    """Summaries of attention recall ``[W, L, S, G]`` (windows, layers, positions, groups; a list of
    ``[L, S, G]`` works too). The primary number, ``median``, is over all entries whose query sees more
    than ``topk`` blocks (position >= ``topk * block_size``: below it the selection is everything and
    recall is 1 by construction); ``median_all_positions`` includes them."""
    r = torch.as_tensor(np.asarray([np.asarray(x) for x in recall]) if isinstance(recall, (list, tuple))
                        else recall).float().cpu()
    if r.dim() == 3:
        r = r[None]
    first = topk * block_size
    nontrivial = r[:, :, first:]
    out = {"median": float(nontrivial.median()) if nontrivial.numel() else float("nan"),
           "mean": float(nontrivial.mean()) if nontrivial.numel() else float("nan"),
           "median_all_positions": float(r.median()),
           "share_below_0.5": float((nontrivial < 0.5).float().mean()) if nontrivial.numel() else float("nan"),
           "first_nontrivial_position": first,
           "by_layer": {"median": [float(x) for x in nontrivial.transpose(0, 1).flatten(1).median(1).values],
                        "mean": [float(x) for x in nontrivial.transpose(0, 1).flatten(1).mean(1)]},
           "by_position": {}}
    for a, b in zip(position_edges[:-1], position_edges[1:]):
        part = r[:, :, a: min(b, r.shape[2])]
        if part.numel():
            out["by_position"][f"[{a},{b})"] = {"median": float(part.median()), "mean": float(part.mean())}
    return out


# --------------------------------------------------------------------------- needle blocks


def _p_all_selected(n_other: int, m: int, picks: int) -> float:
    """P(m given blocks are all among ``picks`` drawn without replacement from ``n_other``)."""
    if m == 0:
        return 1.0
    if m > picks or picks <= 0:
        return 0.0
    return math.comb(n_other - m, picks - m) / math.comb(n_other, picks)


def _p_any_selected(n_other: int, m: int, picks: int) -> float:
    if m == 0:
        return 0.0
    picks = min(picks, n_other)
    return 1.0 - math.comb(n_other - m, picks) / math.comb(n_other, picks)


def needle_hits(selection, query_position: int, span: Sequence[int], *, block_size: int, topk: int) -> dict:
    """Needle-block selection at one query position.

    ``selection``: int ``[..., topk]`` (e.g. ``[layers, groups, topk]``), the blocks the query at
    ``query_position`` selected; ``span`` = ``[start, end)`` token positions of the needle (the
    queried value, ``needles[i]["value_span"]`` of a ruler sample). The needle's blocks are those
    overlapping the span. ``all``: every needle block selected (the whole value readable), ``any``:
    at least one. Chance rates: the local block is always selected, the other ``topk - 1`` drawn
    uniformly from the other visible blocks. Returns the hit rates over the leading dimensions,
    the per-entry hits and the chance rates."""
    sel = torch.as_tensor(np.asarray(selection)).long()
    start, end = int(span[0]), int(span[1])
    if not 0 <= start < end <= query_position + 1:
        raise ValueError(f"needle span {span} is not visible from position {query_position}")
    local = query_position // block_size
    needle = torch.arange(start // block_size, (end - 1) // block_size + 1)
    chosen = (sel[..., :, None] == needle).any(-2)  # [..., m]
    chosen = chosen | (needle == local)
    n_visible = local + 1
    m_other = int((needle != local).sum())
    picks = min(topk - 1, n_visible - 1)
    has_local = bool((needle == local).any())
    chance_all = _p_all_selected(n_visible - 1, m_other, picks)
    chance_any = 1.0 if has_local else _p_any_selected(n_visible - 1, m_other, picks)
    hit_all, hit_any = chosen.all(-1), chosen.any(-1)
    return {"all": float(hit_all.float().mean()), "any": float(hit_any.float().mean()),
            "chance_all": chance_all, "chance_any": chance_any, "needle_blocks": needle.tolist(),
            "visible_blocks": n_visible, "hits_all": hit_all.tolist(), "hits_any": hit_any.tolist()}


# --------------------------------------------------------------------------- output


def run_dir(root: Path, *, arm: str, seed: int | None, date: str | None = None) -> Path:
    """A new folder ``root/<date>_seed<seed>_<arm>`` (``<date>`` = today, UTC, ``YYYY-MM-DD``); a
    folder that exists gets a ``_2``, ``_3``, ... suffix: results are never overwritten."""
    date = date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    base = Path(root) / f"{date}_seed{'-' if seed is None else seed}_{arm}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}_{n}")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.detach().cpu().numpy())
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: Path, obj, *, overwrite: bool = False) -> Path:
    """Write ``obj`` as JSON (numpy/torch values converted; NaN -> null); refuses to replace an existing
    file unless ``overwrite``. Atomic: a temporary file renamed into place."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: results are never overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(_jsonable(obj), indent=1, allow_nan=False) + "\n")
    if overwrite:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)  # fails if path appeared meanwhile
        finally:
            tmp.unlink()
    return path
