"""Several processes building one dictionary, on torch.distributed as launched by torchrun.

`torchrun --nproc-per-node N -m safedig_core collect|build ...` starts N copies of the same command; each
reads its place from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; several
nodes rendezvous as torchrun documents). Work is split by a fixed rule, so the result does not depend on the
number of processes: collection deals the store's shards round-robin over the ranks (shard k to rank
k mod N). Training and adaptation give each position a team of ranks (`Ranks.assign`): with no more ranks than
positions a team is one rank, dealt round-robin like the shards; with more ranks every rank joins one team, and
the team trains its position data-parallel (`Team`: each member takes its share of every batch, the gradients
are summed over the team, every member takes the same optimizer step), so no rank idles. Without torchrun
(WORLD_SIZE unset or 1) everything runs in one process, as before. The backend is gloo on CPU and nccl on CUDA.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


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

    def assign(self, n: int) -> list[tuple[int, ...]]:
        """For each of n positions, the ranks that train it. With no more ranks than positions, one rank each,
        position j to rank j mod world (`owns`); with more, consecutive teams of ⌊world/n⌋ ranks, the first
        world mod n teams one larger, so that every rank is in exactly one team."""
        if self.world <= n or n <= 0:
            return [(j % self.world,) for j in range(n)]
        base, extra = divmod(self.world, n)
        teams, start = [], 0
        for j in range(n):
            size = base + (j < extra)
            teams.append(tuple(range(start, start + size)))
            start += size
        return teams

    def teams(self, n: int) -> dict[int, Team]:
        """{position index: this rank's Team} for the positions this rank trains. Makes the process group of
        every team of several ranks; every rank must call it with the same n (torch.distributed needs every
        process to create every group, in the same order)."""
        mine = {}
        for j, members in enumerate(self.assign(n)):
            group = None
            if len(members) > 1:
                import torch.distributed as dist

                group = dist.new_group(list(members))
            if self.rank in members:
                mine[j] = Team(members, members.index(self.rank), group)
        return mine

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world}"


SINGLE = Ranks()


@dataclass(frozen=True)
class Team:
    """The ranks training one position together, and this rank's place among them. A team of one (`SOLO`)
    makes every method a no-op, so single-process training runs the same code unchanged."""
    members: tuple[int, ...] = (0,)
    index: int = 0
    group: Any = None  # the torch.distributed process group of the members (None for a team of one)

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def leader(self) -> bool:
        """The first member: it writes the team's checkpoint, log and dictionary entry."""
        return self.index == 0

    def share(self, n: int) -> slice:
        """This member's rows of a batch of n: consecutive, the shares' sizes differing by at most one."""
        base, extra = divmod(n, self.size)
        start = self.index * base + min(self.index, extra)
        return slice(start, start + base + (self.index < extra))

    def sum_(self, tensors: Iterable) -> None:
        """Replace each tensor by its sum over the team, in place."""
        if self.size > 1:
            import torch.distributed as dist

            for t in tensors:
                dist.all_reduce(t, group=self.group)

    def sum_grads(self, params: Iterable) -> None:
        """Sum the gradients of `params` over the team (a member whose share was empty contributes zeros)."""
        if self.size > 1:
            import torch

            params = list(params)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.sum_(p.grad for p in params)

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any member (a stop request seen by one member stops them all)."""
        if self.size == 1:
            return flag
        import torch

        t = torch.tensor([float(flag)], device=self._device())
        self.sum_([t])
        return bool(t.item() > 0)

    def _device(self):
        import torch
        import torch.distributed as dist

        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" \
            else torch.device("cpu")

    def __str__(self) -> str:
        return f"member {self.index} of team {list(self.members)}"


SOLO = Team()


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
