"""Overlapping the reading and writing of cases with the compute of another: a one-thread
executor, or, without overlap, one whose calls run in the caller's thread when their result is
asked for (the order of a plain loop)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any


class Deferred(Future):
    """A future whose call runs, in the asking thread, when its result is first asked for."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        """Remember the call."""
        super().__init__()
        self.call: tuple[Callable[..., Any], tuple[Any, ...]] | None = (fn, args)

    def result(self, timeout: float | None = None) -> Any:
        """Run the call the first time, then its result (or raise its exception)."""
        if self.call is not None:
            fn, args = self.call
            self.call = None
            try:
                self.set_result(fn(*args))
            except Exception as err:
                self.set_exception(err)
        return super().result(timeout)


class InPlace(Executor):
    """An executor without threads: each submitted call is Deferred to its result."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """The call, deferred."""
        return Deferred(lambda: fn(*args, **kwargs))


def done(value: Any) -> Future:
    """A future holding `value`."""
    future: Future = Future()
    future.set_result(value)
    return future


def failed(err: Exception) -> Future:
    """A future holding `err` (a stage that failed before its result's future existed)."""
    future: Future = Future()
    future.set_exception(err)
    return future


def background(enabled: bool, name: str) -> Executor:
    """A one-thread executor named `name` when `enabled`, else InPlace."""
    return ThreadPoolExecutor(1, thread_name_prefix=name) if enabled else InPlace()
