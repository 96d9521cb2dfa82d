"""The process group of an expert-parallel run, and the three collectives a layer uses, each ending in
a `DistributedError` that names the rank, the operation and what to do, never a hang.

Launched by `torchrun` (one host or several through its rendezvous): torch reads the rank, world size
and rendezvous address from the environment torchrun sets. The backend is gloo on CPU and NCCL on
CUDA. Every collective is bounded by the group's timeout; a rank that dies closes its connections,
so the others fail at their next collective (gloo) or at the timeout (NCCL, with
TORCH_NCCL_ASYNC_ERROR_HANDLING, torch's default), and torchrun then stops every rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import DistributedError

DEFAULT_TIMEOUT_S = 120.0


@dataclass
class Group:
    rank: int
    world: int
    timeout_s: float
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (NCCL needs CUDA tensors)
    comm_s: float = 0.0  # seconds inside collectives (all-to-all and gather), this rank
    calls: int = 0
    rows_sent: int = 0  # pair rows sent to other ranks
    rows_kept: int = 0  # pair rows this rank kept for itself

    def reset_stats(self) -> None:
        self.comm_s, self.calls, self.rows_sent, self.rows_kept = 0.0, 0, 0, 0

    def stats(self) -> dict:
        total = self.rows_sent + self.rows_kept
        return {"rank": self.rank, "world": self.world, "comm_s": round(self.comm_s, 4), "collectives": self.calls,
                "rows_sent": self.rows_sent, "sent_share": round(self.rows_sent / total, 4) if total else 0.0}

    def _run(self, what: str, fn):
        start = time.perf_counter()
        try:
            out = fn()
        except (RuntimeError, dist.DistBackendError) as ex:
            raise DistributedError(
                f"rank {self.rank} of {self.world}: {what} failed ({_first_line(ex)}); another rank has died, "
                f"stalled or disagrees (collective timeout {self.timeout_s:g} s). Check the other ranks' errors; "
                "torchrun stops the run") from ex
        self.comm_s += time.perf_counter() - start
        self.calls += 1
        return out

    def note_rows(self, kept: int, sent: int) -> None:
        self.rows_kept += kept
        self.rows_sent += sent

    def all_to_all(self, rows: Tensor, send: list[int], recv: list[int]) -> Tensor:
        """rows [sum(send), D] split by `send` over the ranks -> [sum(recv), D] from them, rank order."""
        out = rows.new_empty((sum(recv), rows.shape[-1]))
        self.note_rows(kept=send[self.rank], sent=sum(send) - send[self.rank])
        self._run("all-to-all", lambda: dist.all_to_all_single(out, rows.contiguous(), recv, send))
        return out

    def all_gather_rows(self, rows: Tensor, sizes: list[int]) -> Tensor:
        """This rank's rows [sizes[rank], D] -> every rank's, concatenated [sum(sizes), D]. Padded to the
        largest size, since gloo gathers equal sizes."""
        m = max(sizes)
        padded = rows.new_zeros((m, rows.shape[-1]))
        padded[: rows.shape[0]] = rows
        out = rows.new_empty((self.world * m, rows.shape[-1]))
        self._run("all-gather", lambda: _all_gather(out, padded))
        return torch.cat([out[r * m: r * m + n] for r, n in enumerate(sizes)])

    def check_same(self, value: int, what: str) -> None:
        """Every rank holds the same integer `value` (e.g. a hash of the inputs), else a DistributedError."""
        t = torch.tensor([value, -value], dtype=torch.long, device=self.device)
        self._run(f"comparing {what}", lambda: dist.all_reduce(t, op=dist.ReduceOp.MIN))
        if int(t[0]) != value or -int(t[1]) != value:
            raise DistributedError(f"rank {self.rank}: the ranks were given different {what}; every rank must run "
                                   "the same command with the same inputs")


# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single; 2.11 has the old name only.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _first_line(ex: BaseException) -> str:
    text = str(ex).strip().splitlines()
    return text[0][:300] if text else type(ex).__name__


_GROUP: Group | None = None


def current() -> Group | None:
    """The expert-parallel group of this process, or None when it runs alone."""
    return _GROUP


def init(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Group:
    """Join the run torchrun started (its environment names the rank, world size and rendezvous)."""
    global _GROUP
    if _GROUP is not None:
        return _GROUP
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; expert parallelism needs it")
    try:
        if not dist.is_initialized():
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    except (RuntimeError, ValueError, dist.DistBackendError) as ex:
        raise DistributedError(f"could not join the torchrun group with {backend} ({_first_line(ex)}); launch "
                               "with `torchrun --nproc-per-node N -m moedeploy ...` and check the rendezvous "
                               "address") from ex
    _GROUP = Group(rank=dist.get_rank(), world=dist.get_world_size(), timeout_s=timeout_s, device=device)
    return _GROUP


def close() -> None:
    """Leave the group (at the end of a command), once every rank is done with it: a rank that tears
    down its connections while a peer still uses them can abort in gloo's threads (seen with torch 2.14)."""
    global _GROUP
    if dist.is_available() and dist.is_initialized():
        if _GROUP is not None:
            _GROUP._run("the final barrier", dist.barrier)
        dist.destroy_process_group()
    _GROUP = None
