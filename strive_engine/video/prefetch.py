"""Decode the next batches on a background thread while the current training step runs.

    decode = functools.partial(decode_batch, source=source, pool_frames=P, device=device)
    prefetcher = Prefetcher(loader, decode, depth=cfg.video.prefetch_batches)
    for step in range(steps):
        records, decoded, _ = prefetcher.next()      # blocks only if decoding is slower than the step
        ...
        save(..., data=prefetcher.state_dict())      # resumes at the next batch the trainer consumes
    prefetcher.close()

Bound. At most `depth` batches are decoded ahead of the consumer: the worker takes a slot before it starts
on a batch and `next()` gives the slot back when it hands that batch over, so decoding batch j starts only
after batch j - depth was taken. Decoded-but-unconsumed data (host or device memory) is therefore at most
`depth` batches, plus the one the trainer holds. depth=0 decodes synchronously inside `next()`.

Resume. The worker reads the loader ahead of the trainer, so `loader.state_dict()` is not where training
is. Each queued batch carries the loader state from just before and just after it was drawn; `state_dict()`
returns the "after" state of the last batch `next()` returned (initially the loader's state at
construction): the position of the next batch the trainer will consume. Batches decoded ahead and then
dropped by a restart are drawn again after `load_state_dict`, so none is skipped or repeated.

Errors. An exception in the loader or `decode_fn` is re-raised by the `next()` that would have returned that
batch (the earlier batches are delivered first); the worker stops there and `state_dict()` still points at
the failed batch, so a resume retries it. `close()` never blocks for longer than `timeout` seconds, even with
the worker inside `decode_fn` (it is a daemon thread and exits when that call returns).

CUDA. With CUDA initialised, `decode_fn` runs on the stream that was current when the Prefetcher was built
(the trainer's stream), so the device work it queues (DALI's DLPack waits, host-to-device copies) is ordered
before everything the trainer later issues on that stream: no cross-stream hazards on the frames. Sources that
decode in threads of their own (PyAV with workers > 1, NVDEC, the router's PyAV share) queue their copies and
allocate their frames on the device's default stream, a new thread's current one: that is safe while the trainer
runs on the default stream, as `strive_engine.train` does. A trainer on a side stream would need those threads to
adopt its stream (or the frames' `record_stream`): not done.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any, Callable

import torch

__all__ = ["Prefetcher"]

_POLL_S = 0.1  # how often blocked calls re-check for close() / a dead worker


class _Failure:
    """A worker exception in transit to the consumer."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetcher:
    """Background decoding of `loader`'s batches (a strive_engine.data.RecordLoader, or anything with
    next_batch() and state_dict()) with `decode_fn(records) -> decoded`, at most `depth` batches ahead."""

    def __init__(self, loader, decode_fn: Callable[[list], Any], depth: int, timeout: float = 10.0,
                 on_next: Callable[[list, Any], None] | None = None):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"Prefetcher: depth must be an integer >= 0 (video.prefetch_batches), got {depth!r}")
        self.loader, self.decode_fn, self.depth, self.timeout = loader, decode_fn, depth, timeout
        # Called with (records, decoded) by next() for each batch it hands over: counts kept there cover exactly the
        # batches the trainer consumed, not those decoded ahead (the run's skip summary, strive_engine.pipeline).
        self.on_next = on_next
        self._state = loader.state_dict()  # where the next batch the trainer consumes starts
        self._closed = False
        self._failed: BaseException | None = None
        self.max_ahead = 0  # instrumentation: most batches ever decoded (or decoding) and not yet consumed
        self._ahead = 0
        self._count_lock = threading.Lock()
        self._thread = None
        self._stream = None
        if depth == 0:
            return
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._stream = torch.cuda.current_stream()
        self._slots = threading.Semaphore(depth)
        self._queue: queue.Queue = queue.Queue()  # never holds more than `depth` items: the slots bound it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="strive-prefetch", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------ worker

    def _produce(self) -> tuple[list, Any, dict, dict]:
        before = self.loader.state_dict()
        records = self.loader.next_batch()
        after = self.loader.state_dict()
        with contextlib.ExitStack() as ctx:
            if self._stream is not None:  # a new thread starts on device 0: use the trainer's device and stream
                ctx.enter_context(torch.cuda.device(self._stream.device))
                ctx.enter_context(torch.cuda.stream(self._stream))
            decoded = self.decode_fn(records)
        return records, decoded, before, after

    def _work(self) -> None:
        while not self._stop.is_set():
            if not self._slots.acquire(timeout=_POLL_S):
                continue  # all `depth` slots hold unconsumed batches: wait for next() (or close())
            if self._stop.is_set():
                return
            with self._count_lock:
                self._ahead += 1
                self.max_ahead = max(self.max_ahead, self._ahead)
            try:
                item = self._produce()
            except BaseException as e:  # noqa: BLE001 - everything reaches the consumer, nothing dies silently
                self._queue.put(_Failure(e))
                return
            if self._stream is not None:
                # decode_fn returning does not mean its queued device work finished: the event lets next()
                # order whatever stream the trainer uses by then after that work.
                event = torch.cuda.Event()
                event.record(self._stream)
                item = item + (event,)
            self._queue.put(item)

    # ---------------------------------------------------------------------------------- consumer

    def next(self) -> tuple[list, Any, dict]:
        """(records, decoded, loader state before this batch). Re-raises a worker's exception."""
        if self._closed:
            raise RuntimeError("Prefetcher.next() after close()")
        if self._failed is not None:
            raise RuntimeError("Prefetcher stopped after an error in the loader or decode_fn "
                               f"({type(self._failed).__name__}: {self._failed})") from self._failed
        if self.depth == 0:
            try:
                records, decoded, before, after = self._produce()
            except BaseException as e:  # same contract as the threaded path: the Prefetcher stops here
                self._failed = e
                raise
            self._state = after
            if self.on_next is not None:
                self.on_next(records, decoded)
            return records, decoded, before
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("Prefetcher: the worker thread ended without a result") from None
        if isinstance(item, _Failure):
            self._failed = item.exc
            raise item.exc
        records, decoded, before, after = item[:4]
        if len(item) == 5:
            torch.cuda.current_stream().wait_event(item[4])
        self._state = after
        with self._count_lock:
            self._ahead -= 1
        self._slots.release()  # the worker may start one more batch
        if self.on_next is not None:
            self.on_next(records, decoded)
        return records, decoded, before

    def __iter__(self):
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        """The loader state at the next batch the trainer will consume (pass it to loader.load_state_dict)."""
        return dict(self._state)

    def close(self) -> None:
        """Stop the worker and drop decoded batches. Idempotent; returns within `timeout` seconds."""
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            return
        self._stop.set()
        self._slots.release()  # wake a worker waiting for a slot
        self._thread.join(timeout=self.timeout)
        while True:  # free the queued batches now rather than when the Prefetcher is collected
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
