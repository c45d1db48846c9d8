"""Many workers, one table: documents sharded over ranks, per-document sums gathered.

Under an initialised ``torch.distributed`` process group (``torchrun --nproc-per-node N -m streamlens
sweep ...``, or the Python API after ``init_process_group``), batch ``i`` of the data (the same batches
a single process makes) goes to rank ``i % world_size``. Each rank measures its batches; the per-document
sums are then summed over ranks (``all_reduce``). A document belongs to one batch and a batch to one
rank, so each sum is its own value plus zeros: the gathered sums, and so the table and its bootstrap
intervals, are exactly those of a single process. ``gloo`` runs on CPUs, ``nccl`` on GPUs (the sums go
through the GPU of the rank).

The mean writes of ``mode="mean"`` (one extra pass over all the data) are sharded the same way: rank
``k`` computes the per-batch write sums of batches ``i % N == k``; round by round (``N`` batches at a
time, so memory stays that of ``N`` batches' sums) they are all-gathered and every rank adds them in
batch order, exactly as one process adds them, so every rank's means are bit for bit the single
process's (an all-reduce would add in another order). Independent shard jobs cannot exchange sums:
each computes the mean writes over all the data itself (one clean forward pass, beside the many
removal passes of its share of the sweep).

Independent jobs (a SLURM array) use ``shard=(i, n)`` instead: the same assignment, each job writing
its own document-sums file, joined by :func:`streamlens.skip.merge.merge_shards`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from streamlens.errors import StreamlensError


@dataclass(frozen=True)
class Shard:
    """This worker's share of the batches: batch ``i`` is ours when ``i % count == index``."""

    index: int = 0
    count: int = 1
    collective: bool = False  # sums are all-reduced over a process group

    def mine(self, i: int) -> bool:
        return i % self.count == self.index

    @property
    def tag(self) -> str:
        return f"{self.index}of{self.count}"


def parse_shard(shard) -> Shard:
    """``(i, n)`` or ``"i/n"`` as a :class:`Shard` (independent job ``i`` of ``n``)."""
    if isinstance(shard, str):
        parts = shard.split("/")
        try:
            shard = tuple(int(x) for x in parts)
        except ValueError:
            shard = None
    if (not isinstance(shard, tuple) or len(shard) != 2 or not all(isinstance(x, int) for x in shard)
            or not 0 <= shard[0] < shard[1]):
        raise StreamlensError(f"shard must be 'i/n' with 0 <= i < n (job i of n), got {shard!r}")
    return Shard(shard[0], shard[1])


def current(shard=None) -> Shard:
    """The worker's shard: an explicit ``shard`` job, else this process's rank in an initialised group."""
    import torch.distributed as dist

    group = dist.is_available() and dist.is_initialized()
    if shard is not None:
        if group and dist.get_world_size() > 1:
            raise StreamlensError("shard= is for independent jobs; under torchrun the ranks share the work already")
        return parse_shard(shard)
    if group and dist.get_world_size() > 1:
        return Shard(dist.get_rank(), dist.get_world_size(), collective=True)
    return Shard()


def all_sum(t: Tensor, shard: Shard, device) -> Tensor:
    """``t`` summed over the ranks of the process group (a no-op without one). A rank that failed or left
    makes this an error on the others."""
    if not shard.collective:
        return t
    import torch.distributed as dist

    on = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = t.to(on).contiguous()
    try:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    except Exception as e:  # gloo raises RuntimeError/DistBackendError when a peer is gone
        raise _failed(shard, "gathering the per-document sums", e) from e
    return buf.to(t.device)


def _failed(shard: Shard, what: str, e: Exception) -> StreamlensError:
    return StreamlensError(f"rank {shard.index} of {shard.count}: {what} failed "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); another rank "
                           "probably failed: see its error; a restart with --resume continues from the files written")


def in_batch_order(compute, n: int, shard: Shard):
    """``compute(i)`` for every batch ``i < n``, yielded in batch order on every rank, each computed once:
    on rank ``i % N`` (under a process group; every ``i`` here without one). Results are all-gathered
    ``N`` at a time (``all_gather_object``: return CPU tensors)."""
    if not shard.collective:
        for i in range(n):
            yield compute(i)
        return
    import torch.distributed as dist

    for first in range(0, n, shard.count):
        i = first + shard.index
        got: list = [None] * shard.count
        try:
            dist.all_gather_object(got, compute(i) if i < n else None)
        except Exception as e:  # a peer that failed or left
            raise _failed(shard, f"gathering batch results {first}..{min(first + shard.count, n) - 1}", e) from e
        yield from got[: n - first]


def mean_writes(model, batches: list, over: str, shard: Shard | None = None) -> dict:
    """:func:`streamlens.intervene.means.mean_writes`, with the batches shared over the ranks under a process
    group (see the module docstring): the same bits on every rank as one process computing all of them."""
    from streamlens.intervene import means

    shard = shard or current()
    if not shard.collective:
        return means.mean_writes(model, batches, over)

    def ordered(compute, n: int):
        """Each batch's sums computed on one rank, gathered, and back where one process would have added them:
        the device of the block that wrote them."""
        on_cpu = lambda i: {a: (s.cpu(), c.cpu()) for a, (s, c) in compute(i).items()}  # noqa: E731
        for part in in_batch_order(on_cpu, n, shard):
            yield {a: (s.to(means.atom_device(model, a)), c.to(means.atom_device(model, a))) for a, (s, c) in part.items()}

    sums: dict = {}
    counts: dict = {}
    for part in ordered(lambda i: means.batch_write_sums(model, batches[i]), len(batches)):
        means.add_write_sums(sums, counts, part)
    # the experts' mean shares, computed when first asked for, are sharded the same way; every rank must ask
    # at the same point (the evaluator asks for those of a sweep's units before its first batch)
    return means.MeanWrites(means.finish_means(sums, counts, over), model, batches, over, ordered)


def all_max(value: int, shard: Shard) -> int:
    if not shard.collective:
        return value
    import torch.distributed as dist

    buf = torch.tensor([value], dtype=torch.long)
    if dist.get_backend() == "nccl":
        buf = buf.cuda()
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return int(buf.item())


def is_writer(shard: Shard) -> bool:
    """Whether this worker writes the final table (rank 0 of a group; every independent job writes its own file)."""
    return not shard.collective or shard.index == 0


def init_from_env(args) -> int:
    """Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment): join the process group (``nccl`` when
    ``args.device`` is a GPU, each rank on its ``LOCAL_RANK``'s GPU; ``gloo`` otherwise) and return this
    rank; 0 without torchrun."""
    import atexit
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    if not dist.is_initialized():
        gpu = (args.device or "cpu").startswith("cuda") and torch.cuda.is_available()
        if gpu:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            args.device = f"cuda:{local}"
        dist.init_process_group(backend="nccl" if gpu else "gloo")
        atexit.register(dist.destroy_process_group)
    return dist.get_rank()


def barrier(shard: Shard) -> None:
    """Wait for every rank (a no-op without a process group)."""
    if shard.collective:
        import torch.distributed as dist

        dist.barrier()
