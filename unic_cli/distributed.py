"""The one place that reads the torchrun environment (rank, world size), plus process-group and collective helpers.

Below `commands/`, nothing else reads environment variables. When no process group is initialised (the
single-process case), every collective helper is a no-op, so library code can call them unconditionally.

Data parallelism is torch's own: `torchrun` starts one process per device, `setup()` joins the process group
(NCCL on GPUs, gloo on CPU), and `wrap()` puts the trainable `DistillModel` (student + ladder, one module, so
DDP never needs `find_unused_parameters`) under DistributedDataParallel or, with `fsdp=True`, FSDP2's
`fully_shard` (parameters, gradients and AdamW moments sharded per block; for students too big for DDP).
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from unic_cli.errors import TrainingError

log = logging.getLogger("unic_cli")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun launch."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank, world size and local rank from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK)."""
    env = os.environ
    return DistInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def setup(dist: DistInfo, device: torch.device, *, fsdp: bool = False) -> tuple[torch.device, bool]:
    """Join the process group of a multi-process launch; returns (this process's device, whether we created it).

    A CUDA run uses NCCL and `cuda:LOCAL_RANK`; a CPU run uses gloo. A single process does nothing, except
    with `fsdp` (FSDP2 needs a process group): then it makes a one-process group on a free local port.
    """
    if dist.world_size == 1 and not fsdp:
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if is_initialized():
        return device, False
    if dist.rank == 0 and (problem := restart_store_problem(os.environ)):
        log.warning(problem)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # device_id binds NCCL to this GPU up front (no guessing in the first collective)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if "MASTER_ADDR" not in os.environ:  # not under torchrun: a one-process group
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        kwargs.update(init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    torch.distributed.init_process_group(backend=backend, **kwargs)
    return device, True


def restart_store_problem(env) -> str | None:
    """Why `torchrun --max-restarts` may not restart this launch cleanly, or None.

    torchrun's rendezvous shares one TCP store across restarts (unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), and
    the process group's keys in it carry no per-attempt prefix: a restarted worker can read a failed worker's
    address and fail to connect, or hang (seen with gloo in torch 2.14 in about half of the restarts;
    tests/test_distributed.py). With the variable set, each attempt's rank 0 hosts a fresh store.
    """
    if int(env.get("TORCHELASTIC_MAX_RESTARTS") or 0) > 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return ("torchrun --max-restarts with its shared rendezvous store: a restart can read the failed attempt's "
                "addresses and hang; export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun "
                "(docs/distributed.md)")
    return None


def teardown(created: bool) -> None:
    if created and is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        torch.distributed.barrier()


def _all_reduce(tensor: torch.Tensor) -> None:
    """SUM-all-reduce that names the likely cause when a peer is gone.

    When another process fails (a data error, out of memory) and exits, the survivors' next collective fails with
    a transport error ("Connection closed by peer"); without this, each survivor prints a long traceback that hides
    the real error printed by the failed process.
    """
    try:
        torch.distributed.all_reduce(tensor)
    except RuntimeError as err:  # DistBackendError and gloo's transport errors are RuntimeErrors
        raise TrainingError(f"rank {torch.distributed.get_rank()} lost contact with the other processes, most "
                            f"likely because one of them failed: see its error above ({err})") from None


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average `tensor` in place across processes (no-op without a process group); no host sync."""
    if is_initialized() and (world_size := torch.distributed.get_world_size()) > 1:
        _all_reduce(tensor)  # SUM then divide: gloo has no AVG
        tensor.div_(world_size)
    return tensor


def all_reduce_sum(values: list[int]) -> list[int]:
    """Host integers summed over processes (identity without a process group); a host sync, for logging steps."""
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return list(values)
    nccl = torch.distributed.get_backend() == "nccl"  # NCCL reduces device tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    _all_reduce(tensor)
    return tensor.tolist()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank (identity without a process group)."""
    if not is_initialized():
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=src)
    return holder[0]


def wrap(model: nn.Module, device: torch.device, *, fsdp: bool) -> nn.Module:
    """The module the training step calls: `model` itself (one process), DDP, or FSDP2-sharded in place.

    DDP: no `find_unused_parameters` (every trainable parameter is used in every step; `Student` freezes the
    classifier-side modules its taps never reach), no buffer broadcast (the standardiser statistics are
    all-reduced, hence already equal on every rank). FSDP2: each student block and each teacher's ladder is
    its own shard group, the rest (embeddings, final norm, ladder) forms the root group.
    """
    if fsdp:
        import warnings

        from torch.distributed.fsdp import fully_shard

        # The ladder's predictions are reshaped views; nothing modifies them in place, which is all it warns of.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

        for block in model.student.model.blocks:
            fully_shard(block)
        fully_shard(model)  # the ladder (its weights are read directly, not called) joins the root group
        return model
    if not is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    # torch >= 2.14 deprecates broadcast_buffers (a FutureWarning from every process); its successor still
    # syncs buffers once at init, which is harmless here (every rank built or loaded identical statistics)
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        buffers = {"forward_sync_buffers": False}
    else:
        buffers = {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True, **buffers)


def full_state_dict(module: nn.Module, fsdp: bool) -> dict:
    """A plain (unsharded, CPU) state dict of `module`; with FSDP every rank must call it (it gathers)."""
    if not fsdp:
        return module.state_dict()
    from torch.distributed.tensor import DTensor

    out = {}
    for key, value in module.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()  # a collective: all ranks, same order
        out[key] = value.detach().cpu()
    return out


def load_full_state_dict(module: nn.Module, state: dict, fsdp: bool) -> None:
    """Load a plain state dict into `module`, sharding each tensor like the module's own (FSDP) or as is."""
    if not fsdp:
        module.load_state_dict(state)
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = module.state_dict()
    sharded = {}
    for key, value in state.items():
        target = own[key]
        if isinstance(target, DTensor):
            sharded[key] = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh,
                                             target.placements)
        else:
            sharded[key] = value
    module.load_state_dict(sharded)


def full_optimizer_state(optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    """`optimizer.state_dict()` with every sharded moment gathered (plain tensors, index-keyed as usual)."""
    state = optimizer.state_dict()
    if not fsdp:
        return state
    from torch.distributed.tensor import DTensor

    def full(value):
        return value.full_tensor().cpu() if isinstance(value, DTensor) else value

    return {"state": {i: {k: full(v) for k, v in s.items()} for i, s in state["state"].items()},
            "param_groups": state["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    """Load a plain (index-keyed, unsharded) optimizer state, sharding moments like their parameters."""
    if fsdp:
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for group in optimizer.param_groups for p in group["params"]]
        sharded = {}
        for i, s in state["state"].items():
            p = params[int(i)]
            sharded[i] = {k: distribute_tensor(v.to(p.device, v.dtype), p.device_mesh, p.placements)
                          if isinstance(p, DTensor) and torch.is_tensor(v) and v.ndim else v for k, v in s.items()}
        state = {"state": sharded, "param_groups": state["param_groups"]}
    optimizer.load_state_dict(state)
