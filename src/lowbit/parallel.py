"""Data-parallel quantization over processes with torch.distributed (gloo on CPU, NCCL on GPUs).

Run lowbit under `torchrun --nproc-per-node N -m lowbit quantize ...`: every rank builds the same
model and the same calibration windows, then takes every N-th batch of them. Block by block, each
rank runs its batches through the block and accumulates its layers' input statistics; the sums
and token counts are all-reduced, so every rank holds the same Hessians. The block's layers are
then solved round-robin (layer k on rank k mod N), and each solved layer is broadcast from its
rank to the others (its header entry as JSON, then its tensors), so that every rank runs the
quantized block forward on its own batches for the next block. Rank 0 writes the artifact.

The result equals the single-process one up to the order of the floating-point sums in the
Hessians (fp64 partial sums per rank, then added): the Hessians agree to about 1e-15 relative,
which can flip a rounding decision of GPTQ now and then; the test bounds the difference.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .calib.hessian import HessianAccumulator
from .errors import LowbitError


class ParallelError(LowbitError):
    pass


@dataclass(frozen=True)
class Parallel:
    rank: int
    world: int

    @classmethod
    def from_env(cls) -> "Parallel | None":
        """The process group torchrun describes (WORLD_SIZE > 1), initialised once; else None."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return None
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and os.environ.get("LOWBIT_DIST_BACKEND") == "nccl" else "gloo"
            dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's calibration batches: every world-th one."""
        if len(batches) < self.world:
            raise ParallelError(f"{len(batches)} calibration batch(es) for {self.world} processes: give each process at "
                                "least one (more --n-samples, a smaller calibration batch size, or fewer processes)")
        return batches[self.rank :: self.world]

    def reduce_hessian(self, acc: HessianAccumulator) -> None:
        """Sum every rank's statistics of one layer into all of them."""
        dist.all_reduce(acc.sum)
        count = torch.tensor([acc.count], dtype=torch.int64)
        dist.all_reduce(count)
        acc.count = int(count)

    def owner(self, index: int) -> int:
        return index % self.world

    def _broadcast_json(self, obj, src: int):
        data = json.dumps(obj, sort_keys=True).encode() if self.rank == src else b""
        n = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(n, src)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == src else torch.empty(int(n), dtype=torch.uint8)
        dist.broadcast(buf, src)
        return json.loads(bytes(buf.numpy()).decode())

    def share_module(self, model: nn.Module, name: str, src: int, info: dict | None) -> dict:
        """Make the quantized module `name` that rank `src` built (and its report `info`) every
        rank's: the entry as JSON, an empty module of that kind elsewhere, then its tensors."""
        from .nn import module_from_entry

        entry = model.get_submodule(name).entry() if self.rank == src else None
        entry, info = self._broadcast_json([entry, info], src)
        if self.rank != src:
            model.set_submodule(name, module_from_entry(entry))
        layer = model.get_submodule(name)
        for tensor in layer.state_dict().values():  # the module's own buffers, in place
            dist.broadcast(tensor, src)
        return info
