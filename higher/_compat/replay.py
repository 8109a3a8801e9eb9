"""Recording and replaying a step's random-number and autocast state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def rng_state(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, str, list[int], list[Any]]:
    """The CPU generator's state and that of each accelerator ``tensors`` live on.

    Checkpointed steps record it so that their replay draws the same random
    numbers (dropout masks) as their first run. One state per device, however
    many tensors live there.
    """
    from torch.utils.checkpoint import get_device_states

    one_per_device: dict[torch.device, torch.Tensor] = {}
    for t in tensors:
        if t.device.type not in ("cpu", "meta"):
            one_per_device.setdefault(t.device, t)
    accel = list(one_per_device.values())
    device_type = accel[0].device.type if accel else "cpu"
    devices, states = get_device_states(*accel) if accel else ([], [])
    return torch.get_rng_state(), device_type, devices, states


def same_rng_state(a: Any, b: Any) -> bool:
    """Whether two :func:`rng_state` results are equal."""
    return (
        a[1:3] == b[1:3]
        and torch.equal(a[0], b[0])
        and all(torch.equal(x, y) for x, y in zip(a[3], b[3]))
    )


@contextlib.contextmanager
def replay_rng(state: tuple[torch.Tensor, str, list[int], list[Any]]) -> Iterator[None]:
    """Runs a block with the generators set to ``state``, restoring them afterwards."""
    from torch.utils.checkpoint import set_device_states

    cpu, device_type, devices, states = state
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        torch.set_rng_state(cpu)
        if devices:
            set_device_states(devices, states, device_type=device_type)
        yield


AutocastState = tuple[tuple[str, bool, torch.dtype], ...]


def autocast_state(device_types: tuple[str, ...]) -> tuple[AutocastState, bool]:
    """Whether autocast is on, and in which dtype, for each device type; and its cache flag.

    A checkpointed step records it so that its replay, which runs during the
    outer backward, usually outside the user's ``torch.autocast`` block,
    computes in the precision of its first run.
    """
    state = tuple(
        (d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
        for d in device_types
        if torch.amp.is_autocast_available(d)
    )
    return state, torch.is_autocast_cache_enabled()


@contextlib.contextmanager
def replay_autocast(recorded: tuple[AutocastState, bool]) -> Iterator[None]:
    """Runs a block under the autocast settings :func:`autocast_state` recorded."""
    state, cache = recorded
    with contextlib.ExitStack() as stack:
        for device_type, enabled, dtype in state:
            stack.enter_context(
                torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache)
            )
        yield
