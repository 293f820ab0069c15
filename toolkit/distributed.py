"""Data-parallel training with torch.distributed (torchrun, accelerate launch).

Under a launcher (``WORLD_SIZE`` > 1 in the environment) every process joins the process group through env://
(NCCL when it trains on a CUDA GPU, gloo on the CPU) plus a gloo group for small Python objects (options, data
digests, training sets, errors). Each rank trains its own configurations of a step on its share of the batch;
:meth:`Group.average_gradients` all-reduces the trainable parameters' gradients in one flat buffer once all of a
step's backward passes are done (a step runs several: the anchor, then one per configuration, and may re-weight
the anchor's share, so the reduction follows them rather than DistributedDataParallel's per-backward hooks).
Without a launcher :func:`start` returns a one-process group whose collectives do nothing.

Errors found before training are agreed on (:meth:`Group.agree`): every rank raises the same
:class:`SharedError` and only rank 0 reports it (:func:`reports`); :func:`shutdown` lets rank 0 print before
the others exit.
"""
from __future__ import annotations

import datetime
import os

from converters.errors import CoaloraError


class SharedError(CoaloraError):
    """An error every rank raised at the same point; rank 0 reports it."""


class Group:
    """The ranks training one run (``world`` of them; this process is ``rank``)."""

    def __init__(self, world: int = 1, rank: int = 0, local_rank: int = 0, control=None):
        self.world, self.rank, self.local_rank, self.control = world, rank, local_rank, control

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def device(self, device):
        """A bare ``cuda`` means this rank's GPU (``LOCAL_RANK``) under a launcher."""
        import torch

        if device.type == "cuda":
            if device.index is None:  # torch.cuda.set_device refuses an index-less device: name the GPU
                device = torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()) if self.parallel
                                      else torch.cuda.current_device())
            torch.cuda.set_device(device)
        return device

    # -- objects (gloo group) --------------------------------------------------------------------------
    def gather(self, obj) -> list:
        if not self.parallel:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.parallel:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def barrier(self) -> None:
        if self.parallel:
            import torch.distributed as dist

            dist.barrier(group=self.control)

    def agree(self, fn):
        """``fn()`` on every rank; if it raises a CoaloraError on any rank, every rank raises the same
        SharedError (rank 0's message, else the first failing rank's, named). One process: just ``fn()``."""
        if not self.parallel:
            return fn()
        try:
            result, error = fn(), None
        except CoaloraError as e:
            result, error = None, str(e)
        errors = self.gather(error)
        for r, e in enumerate(errors):
            if e is not None:
                raise SharedError(e if r == 0 else f"rank {r}: {e}")
        return result

    def check_same(self, what: dict) -> None:
        """Stop every rank unless all see the same ``what`` (e.g. options and data digests), naming the first
        rank and the keys that differ from rank 0's."""
        seen = self.gather(what)
        for r, other in enumerate(seen[1:], start=1):
            diff = sorted(k for k in set(seen[0]) | set(other) if seen[0].get(k) != other.get(k))
            if diff:
                raise SharedError(f"rank {r} of {self.world} was started with different {', '.join(diff)} than "
                                  f"rank 0; every rank must get the same options and data")

    # -- tensors (the training backend) -------------------------------------------------------------
    def broadcast_tensors(self, tensors) -> None:
        """Copy rank 0's values into ``tensors`` (all on one device) in place."""
        if not self.parallel or not tensors:
            return
        import torch
        import torch.distributed as dist

        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        dist.broadcast(flat, src=0)
        offset = 0
        with torch.no_grad():
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def average_gradients(self, params, scalars: list[float]) -> list[float]:
        """Average the gradients of ``params`` over the ranks (one all-reduce) and return the ranks' mean of
        ``scalars``. A parameter no rank computed a gradient for keeps ``grad = None`` (the optimizer skips
        it, as one process would); one that only some ranks used gets the others' zeros in the mean."""
        if not self.parallel:
            return list(scalars)
        import torch
        import torch.distributed as dist

        dev = params[0].device
        parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=dev, dtype=p.dtype)
                 for p in params]
        used = torch.tensor([float(p.grad is not None) for p in params], device=dev)
        flat = torch.cat([*(q.float() for q in parts), used, torch.tensor(scalars, dtype=torch.float32, device=dev)])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for i, p in enumerate(params):
            if float(flat[-len(scalars) - len(params) + i]) > 0:
                g = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            offset += p.numel()
        return [float(v) for v in flat[len(flat) - len(scalars):]] if scalars else []


_current = Group()


def start(device_type: str) -> Group:
    """The process group of this launch: joined from the environment that torchrun / accelerate set
    (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or a one-process group."""
    global _current
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        _current = Group()
        return _current
    import torch.distributed as dist

    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("COALORA_DIST_TIMEOUT_S", 3600)))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method="env://", timeout=timeout)
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    _current = Group(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0") or 0), control)
    return _current


def rank() -> int:
    return _current.rank


def reports(error: Exception) -> bool:
    """Whether this process should print ``error``: rank 0 always, the others only their own errors."""
    return _current.is_main or not isinstance(error, SharedError)


def shutdown(error: Exception | None = None) -> None:
    """Leave the process group; after a shared error, wait until rank 0 has reported it (so that a launcher
    stopping the ranks when the first one exits does not cut its message)."""
    global _current
    if not _current.parallel:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        if isinstance(error, SharedError) or error is None:
            try:
                dist.barrier(group=_current.control)
            except RuntimeError:
                pass  # another rank is gone already
        dist.destroy_process_group()
    _current = Group()
