"""MSA across processes: context parallelism on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs)."""

from msa.distributed.context_parallel import context_parallel_attention, gather, shard, zigzag_rows

__all__ = ["context_parallel_attention", "gather", "shard", "zigzag_rows"]
