"""torch.compile for the streaming steps: fixed shapes, a C++ wrapper, and value-only guards.

A streaming step is called every 80 ms frame (the realtime tick, 16 times per frame for the local
transformer, the codec decode) with inputs of the same shapes, so its compiled graph is built once.
What is left per call is dynamo's guard check; identity guards on the many objects a step reads
through (modules, closures, dicts) cost about 0.2 ms per call on a small CPU, so only the guards
that compare values (and the grad mode) are kept: a graph is reused only for
inputs of the same shapes, dtypes and settings. The price: the weights must not be replaced by tensors of another shape afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

_KEPT_GUARDS = frozenset({
    "TENSOR_MATCH", "CONSTANT_MATCH", "EQUALS_MATCH", "TYPE_MATCH", "SEQUENCE_LENGTH",
    # grad mode: a graph traced under inference mode must not serve a call that records gradients
    "GRAD_MODE",
})


def value_guards(entries: list[Any]) -> list[bool]:
    """A ``guard_filter_fn``: keep the guards that compare values, drop identity guards."""
    return [entry.guard_type in _KEPT_GUARDS for entry in entries]


def compile_step(fn: F, backend: str = "inductor") -> F:
    """``fn`` through torch.compile as one graph with static shapes. ``backend="eager"`` only traces (a quick
    check that the step stays capturable, no C++ build)."""
    options: dict[str, Any] | None = None
    if backend == "inductor":
        options = {"cpp_wrapper": True, "guard_filter_fn": value_guards}
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, options=options)
    return compiled  # type: ignore[return-value]
