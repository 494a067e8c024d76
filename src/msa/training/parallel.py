"""Data x context parallel training under ``torchrun`` (``msa train --cp C``): FSDP2 and zig-zag sequence shards.

``torchrun --nproc-per-node N -m msa train --cp C ...`` runs N processes
laid out on a two-dimensional ``DeviceMesh`` of shape ``(N / C, C)``, named
``("dp", "cp")``: rank ``r`` is data-parallel rank ``r // C`` and
context-parallel rank ``r % C``. Gloo on CPUs, NCCL on CUDA (one GPU per
process, ``cuda:LOCAL_RANK``).

**Data.** ``--batch-size`` is the global batch. Every rank draws the same
batch ``[B, S]`` of an update (the same seeded stream); data-parallel rank
``d`` keeps rows ``d * B / dp`` to ``(d + 1) * B / dp - 1``, so the dp ranks
read different sequences and the cp ranks of one dp group the same ones.
The next-token labels (``-100`` on a sequence's last token) and the
positions are taken from the whole sequences first; then each cp rank keeps
its zig-zag share of the tokens, labels and positions
(:func:`msa.distributed.shard`): every token keeps its own target and its
true position for the rotary embeddings. A run on N processes thus trains on
exactly the batches of a one-process run with the same settings.

**Parameters: FSDP2 over all N ranks (the flattened dp x cp mesh).** Each
:class:`~msa.nn.MSATransformer` block is one ``fully_shard`` group, the
embeddings, final norm and LM head another. Before a group's forward (and
again in the backward pass) FSDP all-gathers its whole parameters on every
rank, so all the ranks of a cp group compute with the same parameters. FSDP
over the dp dimension alone would shard less (N / C ways instead of N) and
would leave the cp ranks of a dp group with different gradients: each one
holds only its tokens' part of the loss. Over all N ranks, FSDP's
reduce-scatter sums those parts in the same collective that averages over
the dp ranks: it divides the sum over all N ranks by N, so each rank scales
its loss by C before the backward pass, and the gradient becomes ``(1 / dp)
x sum over dp groups of (sum over their cp ranks)``: the average over the dp
ranks' batches of each batch's gradient, that of one process on the global
batch (the dp ranks hold equal token counts). Model parameters, gradients
and AdamW states are sharded N ways; every rank starts from the same
initialization (seeded, or the same ``--init``).

**Losses.** The LM loss is the mean over the cp group's tokens: each cp rank
divides its tokens' cross-entropy sum by the token count of the group's
sequences and the ranks' values are all-reduced (the gradient stays the
rank's own share, as :func:`msa.distributed.context_parallel_attention`
does for the KL loss, which is the mean over the rows of all the cp ranks).
The logged losses are their mean over the dp ranks: those of the global
batch.

An evaluation (a forward pass without gradients) ends with
:meth:`Parallel.reshard`: FSDP keeps the root group's parameters gathered
after its forward, and the next training step would otherwise compute with
them and never reduce their gradients (the embeddings, final norm and LM
head would silently skip that update).

**Checkpoints.** ``get_model_state_dict`` / ``get_optimizer_state_dict``
with ``full_state_dict=True`` gather the whole model and optimizer state on
rank 0, which alone writes them, in the files a one-process run writes
(``msa generate --model`` loads them, and either kind of run resumes from
them, with any ``--cp``).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from msa.distributed import shard
from msa.nn.transformer import MSATransformer

IGNORE_INDEX = -100  # the label of a sequence's last token: it has no next token


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets its variables)."""
    return all(name in os.environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def check_layout(cp: int, world_size: int, is_launched: bool, batch_size: int, seq_len: int) -> None:
    """Raise ``ValueError`` unless ``cp`` context-parallel ranks can split the ``world_size`` processes and the
    global batches ``[batch_size, seq_len]``."""
    if cp < 1:
        raise ValueError(f"--cp must be >= 1, got {cp}")
    if cp > 1 and not is_launched:
        raise ValueError(f"--cp {cp} splits each sequence over {cp} processes: launch with torchrun "
                         f"--nproc-per-node N -m msa train ... --cp {cp} (N a multiple of {cp})")
    if world_size % cp:
        raise ValueError(f"--cp {cp} must divide the number of processes ({world_size}, torchrun's "
                         "--nproc-per-node x --nnodes)")
    dp = world_size // cp
    if batch_size % dp:
        raise ValueError(f"--batch-size {batch_size} (the global batch) must be a multiple of the {dp} data-parallel "
                         f"ranks ({world_size} processes / --cp {cp})")
    if seq_len % (2 * cp):
        raise ValueError(f"--seq-len {seq_len} must be a multiple of 2 x --cp = {2 * cp}: each of the {cp} "
                         "context-parallel ranks holds two equal zig-zag chunks of every sequence")


class Parallel:
    """The process layout of a data x context parallel run and what the training loop does differently in it.

    Create it with :meth:`start` (inside ``torchrun``); :class:`msa.training.Trainer` takes it as
    ``parallel=``.
    """

    def __init__(self, mesh, shard_mesh, device: torch.device):
        self.mesh, self.shard_mesh, self.device = mesh, shard_mesh, device
        self.dp, self.cp = mesh["dp"].size(), mesh["cp"].size()
        self.dp_rank, self.cp_rank = mesh["dp"].get_local_rank(), mesh["cp"].get_local_rank()
        self.dp_group, self.cp_group = mesh["dp"].get_group(), mesh["cp"].get_group()
        self.is_main = dist.get_rank() == 0

    @classmethod
    def start(cls, cp: int, device: torch.device | None, batch_size: int, seq_len: int) -> Parallel | None:
        """Check the layout (``ValueError``), start the process group and the ``("dp", "cp")`` mesh; None in a
        single process (``--cp 1`` without torchrun, or torchrun with one process)."""
        is_launched = launched()
        world_size = int(os.environ["WORLD_SIZE"]) if is_launched else 1
        check_layout(cp, world_size, is_launched, batch_size, seq_len)
        if world_size == 1:
            return None
        device_type = (device.type if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        if device is not None and device.index is not None:
            raise ValueError(f"--device {device}: under torchrun each process takes cuda:LOCAL_RANK; pass --device "
                             "cuda")
        if device_type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (world_size // cp, cp), mesh_dim_names=("dp", "cp"))
        # the dp x cp mesh flattened: all the ranks, in the same (row-major) order
        shard_mesh = init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp_cp",))
        return cls(mesh, shard_mesh, device)

    def __repr__(self) -> str:
        return f"Parallel(dp={self.dp}, cp={self.cp}, device={self.device})"

    def close(self) -> None:
        dist.barrier()
        dist.destroy_process_group()

    def barrier(self) -> None:
        dist.barrier()

    # ------------------------------------------------------------------ model

    def shard_model(self, model: nn.Module) -> None:
        """Give the attention layers the cp group and shard ``model`` with FSDP2 over all ranks (in place)."""
        if not isinstance(model, MSATransformer):
            raise ValueError(f"data and context parallel training takes an MSATransformer (msa train's --arch msa, "
                             f"or an --init it wrote), got {type(model).__name__}")
        from torch.distributed.fsdp import fully_shard

        model.to(self.device)
        for block in model.layers:
            block.attention.context_parallel_group = self.cp_group if self.cp > 1 else None
            fully_shard(block, mesh=self.shard_mesh)
        fully_shard(model, mesh=self.shard_mesh)

    def reshard(self, model: nn.Module) -> None:
        """Free the whole parameters that a forward pass without gradients (an evaluation) left gathered: FSDP
        keeps the root group's after its forward, and the next training step would then compute with them
        without reducing their gradients."""
        model.reshard()

    def backward_scale(self) -> int:
        """What each rank's loss is multiplied by before ``backward``: FSDP averages over all ``dp x cp`` ranks,
        the cp ranks' shares must add up."""
        return self.cp

    def model_state_dict(self, model: nn.Module) -> dict:
        """The whole state dict on rank 0 (on the CPU), empty elsewhere; every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The whole optimizer state on rank 0 in ``optimizer.state_dict()``'s layout (parameters numbered in
        the order of the parameter groups), empty elsewhere; every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        named = get_optimizer_state_dict(model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return {}
        numbers, groups = {}, []
        for group in named["param_groups"]:
            groups.append(dict(group, params=[numbers.setdefault(name, len(numbers)) for name in group["params"]]))
        return dict(state={numbers[name]: state for name, state in named["state"].items()}, param_groups=groups)

    def load_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                         optimizer_state: dict) -> None:
        """Load whole state dicts (every rank holds them; the optimizer's in ``optimizer.state_dict()``'s
        layout) into the sharded model and optimizer."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
        names = {id(p): name for name, p in model.named_parameters()}
        numbered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        named = dict(state={numbered[number]: state for number, state in optimizer_state["state"].items()},
                     param_groups=[dict(group, params=[numbered[number] for number in group["params"]])
                                   for group in optimizer_state["param_groups"]])
        # not strict: parameters that no update has touched yet (the frozen ones of the warm-up) have no state.
        # Loading first gives every parameter a state (a step with zero gradients); those get none again, as in
        # the optimizer that was saved, so that their first update counts as their first
        set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True, strict=False))
        for name, parameter in model.named_parameters():
            if name not in named["state"]:
                optimizer.state.pop(parameter, None)

    # ------------------------------------------------------------------ data and losses

    def inputs(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's ``(input_ids, position_ids, labels)`` ``[B / dp, S / cp]`` of the global batch ``[B, S]``."""
        rows = batch.shape[0] // self.dp
        batch = batch[self.dp_rank * rows:(self.dp_rank + 1) * rows].to(self.device)
        labels = torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], IGNORE_INDEX)], dim=1)
        positions = torch.arange(batch.shape[1], device=self.device).expand_as(batch)
        return tuple(shard(x, self.cp_group) for x in (batch, positions, labels))

    def _token_loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits if logits.dtype == torch.float64 else logits.float()  # as msa.training.recipe.lm_loss
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum",
                                           ignore_index=IGNORE_INDEX)

    def lm_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The next-token loss's mean over the tokens of the cp group's sequences, the same value on its ranks;
        its gradient is this rank's share (the cp ranks' gradients add up to the whole one)."""
        tokens = labels.shape[0] * (labels.shape[1] * self.cp - 1)
        share = self._token_loss_sum(logits, labels) / tokens
        if self.cp == 1:
            return share
        total = share.detach().clone()
        dist.all_reduce(total, group=self.cp_group)
        return share + (total - share.detach())

    def eval_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """The next-token loss's mean over the global batch (every rank must call it)."""
        total = self._token_loss_sum(logits, labels).detach().double()
        dist.all_reduce(total)
        return total.item() / (labels.shape[0] * self.dp * (labels.shape[1] * self.cp - 1))

    def dp_mean(self, values: list[float]) -> list[float]:
        """The mean over the dp ranks of each of ``values`` (losses of each dp rank's batch)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, group=self.dp_group)
        return (tensor / self.dp).tolist()

    def any(self, flags: list[bool]) -> list[bool]:
        """Each flag true on any rank: decisions taken on the ranks' clocks (time limits) made the same."""
        tensor = torch.tensor(flags, dtype=torch.int32, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return [bool(flag) for flag in tensor.tolist()]
