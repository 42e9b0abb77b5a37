"""Batches transferred to the devices ahead of the train step, with the iterator position kept exact.

    it = DevicePrefetch(make_train_iterator(...), put=lambda b: shard_batch(b, mesh), depth=2)
    batch = next(it)          # already global jax.Arrays on the mesh; the next `depth` are in flight
    state = it.get_state()    # the position after the batches handed out, not after those prefetched

`put` issues an asynchronous host-to-device copy, so while step n runs the host already reads, decodes and
transfers batches n+1 .. n+depth (big_vision and MaxText prefetch the same way). A checkpoint stores
get_state(): the state the wrapped iterator had right after yielding the last batch handed to the caller, so a
resume replays nothing and skips nothing, whatever was prefetched.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterator


class DevicePrefetch:
    """Iterator wrapper: keeps up to `depth` batches put on the devices ahead of the consumer."""

    def __init__(self, iterator: Iterator[dict], put: Callable[[dict], dict], depth: int = 2):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self._it = iterator
        self._put = put
        self._depth = depth
        self._queue: collections.deque[tuple[dict, Any]] = collections.deque()
        self._state = iterator.get_state()
        self._done = False

    def __iter__(self) -> DevicePrefetch:
        return self

    def _fill(self, n: int) -> None:
        while not self._done and len(self._queue) < n:
            try:
                local = next(self._it)
            except StopIteration:
                self._done = True
                return
            self._queue.append((self._put(local), self._it.get_state()))

    def __next__(self) -> dict:
        self._fill(1)
        if not self._queue:
            raise StopIteration
        batch, self._state = self._queue.popleft()
        self._fill(self._depth)  # start the next transfers before the caller dispatches its step
        return batch

    def get_state(self) -> Any:
        """The wrapped iterator's state after the last batch returned by __next__."""
        return self._state

    def stats(self) -> dict[str, Any]:
        return self._it.stats() if hasattr(self._it, "stats") else {}
