"""Data-parallel training under torchrun: the process group, DDP or FSDP2, and whole states for checkpoints.

Sits between the trainer and `torch.distributed`. `launch` joins the group torchrun describes (WORLD_SIZE, RANK,
LOCAL_RANK; NCCL on CUDA, gloo on CPU) and yields a `World`; in a plain process the World has one rank and every
method below is the identity or a no-op, so the trainer has a single code path.

What the trainer relies on:
- `wrap` puts the student and the modules trained beside it (`TrainedModules`) under DDP, or FSDP2 (`fully_shard`
  on each decoder block, then on the whole). Both average the gradients of every wrapped parameter over the ranks,
  including those used outside the wrapped forward (the output head in the loss, the feature projections).
- The trainer weights each rank's loss so that this average is the gradient of the loss of the global batch.
- Checkpoints keep the single-process format: under FSDP the sharded parameters and optimizer states are gathered
  whole (`World.whole`) for rank 0 to write, and spread back into shards on load (`loading`, `shard_optimizer_state`).
  A checkpoint of a run on N processes therefore opens in a single process too; resuming a run needs the same N.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from storage.causal_lm import resolve_device

log = logging.getLogger(__name__)


class TrainedModules(nn.Module):
    """The student and the modules trained beside it, as the one module DDP or FSDP wraps.

    Its forward is the student's base model, up to the final hidden states (the loss applies the output head itself,
    a chunk of positions at a time). The state dict prefixes are "model." and "feature_head.".
    """

    def __init__(self, model: nn.Module, feature_head: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.feature_head = feature_head

    def forward(self, **inputs):
        return self.model.base_model(**inputs)


@dataclass(frozen=True)
class World:
    """The ranks of a run, as this process sees them.

    Attributes:
        rank: this process's rank.
        world_size: number of processes.
        mode: "ddp" or "fsdp" (used when world_size > 1).
        device: this process's device (cuda:LOCAL_RANK on a multi-GPU run).
    """

    rank: int = 0
    world_size: int = 1
    mode: str = "ddp"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes metrics, checkpoints and the final model."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1 and self.mode == "fsdp"

    def wrap(self, modules: TrainedModules) -> nn.Module:
        """`modules` under DDP or FSDP2; as it is in a single process. Create the optimizer afterwards: FSDP2
        replaces the parameters with sharded ones."""
        if self.world_size == 1:
            return modules
        if self.mode == "ddp":
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(modules, device_ids=device_ids)
        from torch.distributed.fsdp import fully_shard

        blocks = set(getattr(modules.model, "_no_split_modules", None) or ())
        if not blocks:
            raise ValueError(f"--distributed fsdp: {type(modules.model).__name__} does not name its decoder blocks "
                             "(_no_split_modules), which FSDP shards one by one; use --distributed ddp.")
        for module in modules.model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module)
        fully_shard(modules)  # the rest: embeddings, final norm, output head, feature projections
        return modules

    def unwrapped(self, replica: nn.Module) -> nn.Module:
        """The module to run outside the training step (evaluation). DDP's own forward would take part in its
        gradient synchronisation; FSDP's gathers the shards, so every rank must call it equally often."""
        return replica.module if isinstance(replica, nn.parallel.DistributedDataParallel) else replica

    def gradient_sync(self, replica: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward: reduce gradients over the ranks only when `sync` (the last
        micro-batch of an optimizer step); the others accumulate locally."""
        if self.world_size == 1:
            return contextlib.nullcontext()
        if self.sharded:
            replica.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else replica.no_sync()

    def sum(self, values: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """The element-wise sum of `values` over the ranks (float64, on the CPU)."""
        values = torch.as_tensor(values, dtype=torch.float64)
        if self.world_size == 1:
            return values
        values = values.to(self.device)
        dist.all_reduce(values)
        return values.cpu()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def clip_grad_norm(self, parameters: list[torch.Tensor], max_norm: float) -> float:
        """Clip the gradients' global norm (the same on every rank) and return it before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return float(norm.full_tensor() if self.sharded else norm)

    def whole(self, replica: nn.Module, optimizer: torch.optim.Optimizer) -> Whole | None:
        """The student, feature projections and optimizer as `save_checkpoint` and `save_pretrained` read them, with
        whole states; None on the ranks other than 0 under FSDP. Every rank must call it: FSDP gathers the shards
        (to rank 0's CPU). In a single process and under DDP, the modules and optimizer themselves."""
        modules = self.unwrapped(replica)
        if not self.sharded:
            return Whole(modules.model, optimizer, modules.feature_head)
        state = _gathered(replica.state_dict(), keep=self.is_main)
        optimizer_state = optimizer.state_dict()
        per_param = {index: _gathered(values, keep=self.is_main) for index, values in optimizer_state["state"].items()}
        if not self.is_main:
            return None
        parts = {prefix: {name.removeprefix(f"{prefix}."): value for name, value in state.items()
                          if name.startswith(f"{prefix}.")} for prefix in ("model", "feature_head")}
        return Whole(model=_Gathered(parts["model"], modules.model),
                     optimizer=_Gathered({"state": per_param, "param_groups": optimizer_state["param_groups"]}),
                     feature_head=_Gathered(parts["feature_head"]) if modules.feature_head is not None else None)

    def loading(self) -> contextlib.AbstractContextManager:
        """Around `load_state_dict` of whole tensors into sharded modules: each rank copies in its own shard."""
        if not self.sharded:
            return contextlib.nullcontext()
        from torch.distributed.tensor.experimental import implicit_replication

        return implicit_replication()

    def shard_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """After `optimizer.load_state_dict` of a whole state: shard the states shaped like their sharded
        parameter, as that parameter is."""
        if not self.sharded:
            return
        from torch.distributed.tensor import DTensor, distribute_tensor

        for group in optimizer.param_groups:
            for param in group["params"]:
                state = optimizer.state[param]
                for name, value in state.items():
                    if isinstance(param, DTensor) and not isinstance(value, DTensor) and value.shape == param.shape:
                        state[name] = distribute_tensor(value.to(self.device), param.device_mesh, param.placements,
                                                        src_data_rank=None)


@dataclass(frozen=True)
class Whole:
    """What a checkpoint holds, each with `state_dict()` (and the student `save_pretrained`) giving whole states."""

    model: nn.Module | _Gathered
    optimizer: torch.optim.Optimizer | _Gathered
    feature_head: nn.Module | _Gathered | None


@dataclass(frozen=True)
class _Gathered:
    """A sharded module's or optimizer's state, gathered whole, in the place of the module or optimizer."""

    state: dict
    module: nn.Module | None = None  # the student, for its config and `save_pretrained`

    def state_dict(self) -> dict:
        return self.state

    def save_pretrained(self, path, **kwargs) -> None:
        self.module.save_pretrained(path, state_dict=self.state, **kwargs)


def _gathered(state: dict, *, keep: bool) -> dict:
    """`state` with each sharded tensor gathered whole (a collective: every rank calls it, in the same order), on
    the CPU; empty unless `keep`."""
    from torch.distributed.tensor import DTensor

    whole = {}
    for name, value in state.items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if keep:
            whole[name] = value.cpu() if isinstance(value, torch.Tensor) else value
    return whole


@contextlib.contextmanager
def launch(mode: str, device: str) -> Iterator[World]:
    """The World of this process: one rank, or under torchrun the process group it describes, joined here (and left
    on exit) unless the caller has joined it already.

    Args:
        mode: "ddp" or "fsdp" (`TrainConfig.distributed`).
        device: the --device option; under torchrun, CUDA means cuda:LOCAL_RANK on each rank.

    Raises:
        ValueError: a CUDA device with an index under torchrun.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield World(device=resolve_device(device))
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        if resolved.index is not None:
            raise ValueError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda "
                             "or auto, and choose the GPUs with CUDA_VISIBLE_DEVICES.")
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    joined = not dist.is_initialized()
    if joined:
        if resolved.type == "cuda":
            dist.init_process_group("nccl", device_id=resolved)
        else:
            dist.init_process_group("gloo")
    world = World(rank=rank, world_size=world_size, mode=mode, device=resolved)
    if world.is_main:
        log.info("distributed: %d processes, %s, %s", world_size, mode, resolved.type)
    try:
        yield world
    finally:
        if joined:
            dist.destroy_process_group()
