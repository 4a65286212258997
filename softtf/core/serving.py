"""Forward calls in flight, and the structural changes they rule out (issue 15, serving).

Every ``SoftLinear`` and every ``SoftModel`` owns a :class:`ServingGuard`: its lock, and a count of
its forward calls in flight per thread. A forward enters under the lock (a layer takes its snapshot
of the selection in the same critical section) and leaves when it returns or raises; the lock is
not held while it computes. A structural change (add, freeze, delete, load, merge, unwrap) runs
under :func:`exclusive`: it takes the locks of everything it changes (the model's, then every
layer's, always in that order), refuses with a ``RuntimeError`` if any call of another thread is
in flight in any of them, and only then changes anything. Calls of the changing thread itself (a
change made from inside its own forward, by a hook say) do not count: they cannot overlap it.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Iterator, Sequence

import torch

__all__ = ["ServingGuard", "exclusive", "refuse_if_serving", "counted"]


class ServingGuard:
    """A lock and the forward calls in flight under it, per thread (see the module's doc)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._calls: dict[int, int] = {}  # thread ident -> forward calls of that thread in flight

    def __reduce__(self):  # copy / deepcopy / pickle: a fresh lock, no calls in flight
        return (ServingGuard, ())

    def enter(self) -> None:
        with self.lock:
            me = threading.get_ident()
            self._calls[me] = self._calls.get(me, 0) + 1

    def leave(self) -> None:
        with self.lock:
            me = threading.get_ident()
            left = self._calls[me] - 1
            if left:
                self._calls[me] = left
            else:
                del self._calls[me]

    def in_flight(self) -> int:
        """Forward calls in flight in threads other than the current one."""
        me = threading.get_ident()
        with self.lock:
            return sum(n for thread, n in self._calls.items() if thread != me)

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """One forward call in flight for the length of the block (nothing counted while traced)."""
        if torch.compiler.is_compiling():
            yield
            return
        self.enter()
        try:
            yield
        finally:
            self.leave()


def _refusal(operation: str, busy: int) -> RuntimeError:
    calls = "1 forward call is" if busy == 1 else f"{busy} forward calls are"
    return RuntimeError(
        f"{operation} refused: {calls} in flight in other threads, and structural changes (add, freeze, delete, "
        "load, merge, unwrap) are refused while the model serves, so that no call sees half a change. Wait for "
        "the calls to finish (stop sending new ones first), or change a copy (copy.deepcopy) and swap it in"
    )


def refuse_if_serving(guards: Sequence[ServingGuard], operation: str) -> None:
    """Raise the refusal now if a call of another thread is in flight (a check before slow work,
    such as reading a file; the change itself must still run under :func:`exclusive`)."""
    busy = max((g.in_flight() for g in guards), default=0)
    if busy:
        raise _refusal(operation, busy)


@contextlib.contextmanager
def exclusive(guards: Sequence[ServingGuard], operation: str) -> Iterator[None]:
    """Hold every guard's lock (in the order given) for the block, after checking that no other
    thread has a forward call in flight under any of them: new calls wait for the block to end, so
    a check of every layer followed by the change of every layer is all or nothing. ``operation``
    (e.g. ``"SoftModel.add_task('t3')"``) names the change in the error."""
    with contextlib.ExitStack() as held:
        for guard in guards:
            held.enter_context(guard.lock)
        refuse_if_serving(guards, operation)
        yield


def counted(method: Callable, guard: ServingGuard) -> Callable:
    """``method`` with each call counted as a forward call in flight under ``guard``."""

    @functools.wraps(method)
    def call(*args, **kwargs):
        with guard.call():
            return method(*args, **kwargs)

    return call
