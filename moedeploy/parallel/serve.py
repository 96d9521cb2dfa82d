"""Serving an expert-parallel model: rank 0 runs the HTTP server and the engine; every other rank
follows, running the same model steps with its own KV cache and its own experts.

    rank 0: Engine ─► LeaderRunner.run(step) ══broadcast (pending KV frees, step)══► every follower
                                └─► the model step (MoE layers exchange pairs with the followers' layers)
    rank r: follow(): receive ─► free what rank 0 freed ─► ModelRunner.run(step) ─► receive ...

The step message is a plain `runner.Step` (token ids, positions, segments, KV limits), so followers
never schedule, sample or see HTTP. It travels on its own gloo group with a long timeout: an idle
server sends nothing, and its followers wait. A rank that dies still ends the run: its sockets close,
and the others' next collective fails. When rank 0 stops (SIGTERM drains its requests first), it sends
a stop message and the followers return; they ignore SIGTERM while they wait for it.
"""

from __future__ import annotations

import signal
import sys
from datetime import timedelta

import torch.distributed as dist

from ..engine.runner import ModelRunner, Step
from ..errors import DistributedError
from .group import Group

IDLE_TIMEOUT = timedelta(days=30)  # followers of an idle server wait this long for the next step


def step_group():
    """The group steps travel on (gloo, so messages stay on the CPU); every rank creates it, in the same order."""
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


class LeaderRunner(ModelRunner):
    """Rank 0's runner: each step, and the KV frees before it, are broadcast before rank 0 runs it."""

    def __init__(self, model, group: Group):
        super().__init__(model)
        self.group = group
        self.steps = step_group()
        self.pending: list[tuple] = []  # KV operations since the last message: ("free", ids) or ("reset",)

    def run(self, step: Step):
        self._send(step)
        return super().run(step)

    def free(self, request_ids: list[int]) -> None:
        super().free(request_ids)
        self.pending.append(("free", list(request_ids)))

    def reset(self) -> None:
        super().reset()
        self.pending = [("reset",)]

    def stop(self) -> None:
        """Release the followers: they return from `follow`."""
        self._send(None)

    def _send(self, step: Step | None) -> None:
        message = [(self.pending, step)]
        self.pending = []
        self.group._run("sending a step to the followers",
                        lambda: dist.broadcast_object_list(message, src=0, group=self.steps))


def follow(model, group: Group) -> int:
    """Rank r > 0 of an expert-parallel server: run rank 0's steps until it says stop. Returns the steps run."""
    runner = ModelRunner(model)
    steps = step_group()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 drains first, then stops us
    ran = 0
    message = [None]
    while True:
        group._run("waiting for rank 0's next step", lambda: dist.broadcast_object_list(message, src=0, group=steps))
        pending, step = message[0]
        for op in pending:
            runner.reset() if op[0] == "reset" else runner.free(op[1])
        if step is None:
            return ran
        try:
            runner.run(step)
        except DistributedError:
            raise
        except Exception as ex:  # rank 0 failed the same step: its requests end with an error, the server goes on
            print(f"moedeploy: rank {group.rank}: a step failed ({type(ex).__name__}: {ex})", file=sys.stderr)
        ran += 1
