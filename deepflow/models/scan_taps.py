"""A way out of a scanned body for values a listener keeps there: the body (``layers.block_stack``'s
``nn.scan`` over transformer blocks) returns what was kept as its scanned outputs, stacked on the
layer axis, and hands the stack to the listener after the scan.

A value computed inside a scan's trace can leave it only as one of the scan's outputs, so a
listener (DP-SGD's ghost clipping: each covered layer's input, ``deepflow.privacy.ghost``) cannot
collect it by itself. Without a listener nothing is kept and the scan has no extra outputs.

A body that opens ``body()`` must be scanned once per layer with its parameters stacked on axis
0 (``variable_axes={'params': 0}``): a listener reads each step's parameters as that layer's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Callable, Iterator

from flax.core.tracers import current_trace


@dataclasses.dataclass
class Body:
  """A scanned body being traced: its trace, which scan it is (how many scans emitted before
  it under the listener: Flax traces a body more than once, the last trace is the scan's), how
  many calls the listener has seen in it, and what it kept there."""
  trace: Any
  scan: int
  calls: int = 0
  kept: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Listener:
  on_emit: Callable[[dict], None]
  emitted: int = 0


class _Stacks(threading.local):
  """Per thread, like Flax's interceptor stack: a trace in another thread sees none of these."""
  def __init__(self):
    self.bodies: list[Body] = []
    self.listeners: list[_Listener] = []


_stacks = _Stacks()


@contextlib.contextmanager
def body() -> Iterator[dict]:
  """Around a scanned body's layers; yields the dict the body returns as scanned outputs."""
  frame = Body(current_trace(), _stacks.listeners[-1].emitted if _stacks.listeners else 0)
  _stacks.bodies.append(frame)
  try:
    yield frame.kept
  finally:
    _stacks.bodies.pop()


def current_body() -> Body | None:
  """The scanned body whose trace is the current one, when a listener is on and the body is
  not itself inside another (nested bodies keep nothing)."""
  bodies = _stacks.bodies
  if _stacks.listeners and len(bodies) == 1 and bodies[0].trace == current_trace():
    return bodies[0]
  return None


def emit(stacked: dict) -> None:
  """After a scan, in its caller's trace: the body's kept values, stacked on the layer axis."""
  if _stacks.listeners and not _stacks.bodies:
    listener = _stacks.listeners[-1]
    listener.on_emit(stacked)
    listener.emitted += 1


@contextlib.contextmanager
def listening(on_emit: Callable[[dict], None] = lambda stacked: None
              ) -> Iterator[None]:
  """Keep values in scanned bodies and hand each scan's stack to ``on_emit(stacked)``."""
  _stacks.listeners.append(_Listener(on_emit))
  try:
    yield
  finally:
    _stacks.listeners.pop()
