"""Several processes building one dictionary, on torch.distributed as launched by torchrun.

`torchrun --nproc-per-node N -m safedig_core collect|build ...` starts N copies of the same command; each
reads its place from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; several
nodes rendezvous as torchrun documents). Work is split by a fixed rule, so the result does not depend on the
number of processes: collection deals the store's shards round-robin over the ranks (shard k to rank
k mod N), training and adaptation deal the positions the same way. Without torchrun (WORLD_SIZE unset or 1)
everything runs in one process, as before. The backend is gloo on CPU and nccl on CUDA.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


class DistributedError(RuntimeError):
    """The torchrun environment is inconsistent (e.g. RANK out of range)."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owns(self, k: int) -> bool:
        """Whether item k (a shard, a position) is this rank's: k mod world."""
        return k % self.world == self.rank

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world}"


SINGLE = Ranks()


def from_env(device: str | None = None) -> Ranks:
    """This process's place, from torchrun's variables; joins the process group (once) when there are several.
    `device`: the training/sampling device, which picks the backend (nccl for CUDA, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return SINGLE
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is not in 0..{world - 1} (WORLD_SIZE={world}); start the command "
                               "with torchrun, which sets both")
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = (device or "").startswith("cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    return Ranks(rank, world, local)
