"""What one forward pass needs beyond its tensors: the phase's precision and the attention plan.

The model runner sets it around `model(...)`; linear layers read the precision, attention layers the
backend and its metadata. Model files therefore carry no precision or batch-layout arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass
class ForwardContext:
    precision: str
    attn_backend: Any
    attn_meta: Any
    # called after each layer has written its KV (transfer backends overlap sending with compute)
    layer_done: Callable[[int], None] | None = None
    # Mix-Quant: the precision of the k and v columns of qkv projections, when not `precision` (None: the same)
    kv_precision: str | None = None


_current: ForwardContext | None = None


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _current
    prev, _current = _current, ctx
    try:
        yield ctx
    finally:
        _current = prev


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("no forward context: call the model through ModelRunner")
    return _current
