"""Multi-process runs (`accelerate launch`, `torchrun`): every rank trains, only rank 0 writes.

The launchers set RANK / WORLD_SIZE in the environment, so these helpers read it there and need no
process group until ranks actually have to wait for each other.
"""
from __future__ import annotations

import os

from pipeline.models import pick_device


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def uses_cpu() -> bool:
    """True when training runs on the CPU; DDP then needs gloo, which accelerate picks only when told."""
    return pick_device().type == "cpu"


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if world_size() == 1:
        return
    from accelerate import PartialState

    PartialState(cpu=uses_cpu()).wait_for_everyone()
