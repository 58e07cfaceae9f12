"""Continuous batching: many callers, one runtime, one decode batch.

    sched = Scheduler(Blip2Runtime("bundle/"), SchedulerConfig(max_batch=8, max_queue=64, timeout=60))
    sched.start()
    req = sched.submit(Request(pixel_values, prompt, prompt_ids, config, on_event=print))
    ...
    sched.drain(); sched.close()

A scheduler thread owns a :class:`runtime.serving.slots.SlotCache` (KV slots allocated once). At every
step boundary it

1. drops running or waiting requests that were cancelled (the caller went away) or ran past their
   deadline (a :class:`RequestTimeout` event), freeing their slots;
2. admits waiting requests into the free slots: their vision + Q-Former run as one batch, and their
   prefill as one batch into the new rows. Newcomers that do not fill the free slots may wait a little for
   company (closed-loop callers arrive a few ms apart): at most ``ADMIT_WAIT_SHARE`` of the measured cost
   of admitting one request, and never over ``admit_window`` seconds; while the batch is empty the wait
   also ends once arrivals stop (no newcomer for a quarter of that time);
3. chooses each running row's next token with that request's own processors (greedy, or sampling with its
   own seeded rng), streams the new text, and retires rows that are finished;
4. runs one decode step for every row still running.

A greedy request's tokens are those ``Blip2Runtime.generate`` gives for it alone (each row attends only
to its own positions, with its own position ids). Beam search, and bundles whose LLM is not
decoder-only, run on a serial lane (``Blip2Runtime.generate``, one request at a time, in its own thread)
that shares the queue bound, the deadlines and the events.

Every wait is bounded: :meth:`Scheduler.submit` raises :class:`QueueFull` (with a retry-after estimate)
when ``max_queue`` requests are waiting, and :class:`Draining` once :meth:`Scheduler.drain` was called.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from runtime.contract import Family, GraphName
from runtime.deadline import deadline
from runtime.errors import Blip2Error, LimitError
from runtime.generation import GenerationConfig, LogitsProcessors, processors
from runtime.serving.slots import SlotCache
from runtime.serving.text import TextAssembler

# Newcomers wait for company at most this share of the measured cost of admitting one request (vision +
# Q-Former + prefill): on the bench preset (ViT-B/16, ~0.25 s per image on 2 cores) about 25 ms, on the demo
# model (~2 ms per image) about 0.2 ms, so a lone caller loses at most this share of its admission time.
ADMIT_WAIT_SHARE = 0.1


class QueueFull(Blip2Error):
    """``max_queue`` requests are already waiting."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, hint="retry later, or start the server with a larger --max-queue")
        self.retry_after = retry_after


class Draining(Blip2Error):
    """The scheduler is stopping: it finishes what it holds and takes nothing new."""


class RequestTimeout(LimitError):
    """A request ran past its deadline (its slot is freed)."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 8  # KV slots: requests decoded together
    max_queue: int = 64  # requests waiting for a slot
    timeout: float | None = 600.0  # seconds from submission to the last token (None: no limit)
    kv_capacity: int | None = None  # positions per KV slot (None: the bundle's context)
    admit_window: float = 0.05  # seconds newcomers may wait to be admitted together (0: each at once)

    def validate(self, rt) -> SchedulerConfig:
        batch = rt.manifest.dims["batch"]
        if not 1 <= self.max_batch <= batch.max:
            raise LimitError(f"max_batch {self.max_batch} is outside the bundle's batch range [1, {batch.max}]",
                             hint="lower --max-batch, or re-export the bundle with a larger --max-batch")
        if self.max_queue < 0:
            raise LimitError(f"max_queue must be >= 0 (got {self.max_queue})")
        if self.timeout is not None and self.timeout <= 0:
            raise LimitError(f"timeout must be > 0 seconds (got {self.timeout})")
        if not 0 <= self.admit_window <= 10:
            raise LimitError(f"admit_window must be between 0 and 10 seconds (got {self.admit_window})",
                             hint="pass --admit-window-ms between 0 and 10000")
        m = rt.manifest.model
        if self.kv_capacity is not None and not m.num_query_tokens + 2 <= self.kv_capacity <= m.max_context:
            raise LimitError(f"kv_capacity {self.kv_capacity} must be between {m.num_query_tokens + 2} and the "
                             f"bundle's context of {m.max_context}")
        return self


@dataclass
class Event:
    """What a request's ``on_event`` receives, from the scheduler thread.

    kind ``"token"``: ``text`` is the new piece (may be empty), ``token_id`` the id;
    ``"done"``: ``text`` the whole text, ``finish_reason`` "stop" or "length", ``token_ids`` all ids;
    ``"error"``: ``error`` the exception (:class:`RequestTimeout`, a :class:`Blip2Error`, or another error).
    """

    kind: str
    text: str = ""
    token_id: int | None = None
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    error: BaseException | None = None


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    pixel_values: np.ndarray  # [1, 3, H, W], preprocessed
    prompt: str
    prompt_ids: list[int]
    config: GenerationConfig
    on_event: Callable[[Event], None]
    stop: tuple[str, ...] = ()  # stop strings
    stream: bool = True  # send a "token" event per token (else only the final event)
    id: int = field(default_factory=lambda: next(_ids))
    submitted: float = 0.0
    expires: float = math.inf
    first_token: float | None = None
    cancelled: bool = False
    closed: bool = False  # a final event (done / error) was sent
    tokens: list[int] = field(default_factory=list)
    history: list[int] = field(default_factory=list)
    procs: LogitsProcessors | None = None
    text: TextAssembler | None = None

    def cancel(self) -> None:
        """The caller went away: the scheduler drops the request at its next step boundary."""
        self.cancelled = True

    @property
    def serial(self) -> bool:
        return self.config.num_beams > 1


class SchedulerObserver:
    """Hooks for metrics (called from the scheduler threads); the defaults do nothing."""

    def on_step(self, rows: int, seconds: float) -> None: ...

    def on_admit(self, newcomers: int, seconds: float) -> None: ...

    def on_finish(self, req: Request, status: str, now: float) -> None: ...


def _as_error(e: Exception) -> Blip2Error:
    return e if isinstance(e, Blip2Error) else Blip2Error(f"generation failed: {type(e).__name__}: {e}")


class Scheduler:
    def __init__(self, rt, config: SchedulerConfig, observer: SchedulerObserver | None = None):
        self.rt = rt
        self.config = config.validate(rt)
        self.observer = observer or SchedulerObserver()
        m = rt.manifest.model
        self.batched = rt.family is Family.DECODER_ONLY
        self.capacity = config.kv_capacity or m.max_context
        self.cache: SlotCache | None = None
        if self.batched:
            self.cache = SlotCache(rt.manifest, rt.graph(GraphName.DECODER), rt.embed, slots=config.max_batch,
                                   capacity=self.capacity)
        self._cond = threading.Condition()
        self._queue: deque[Request] = deque()  # waiting for a slot
        self._serial: deque[Request] = deque()  # waiting for the serial lane
        self._rows: list[Request] = []  # row b of the cache runs _rows[b]
        self._logits: np.ndarray | None = None  # [rows, vocab]: next-token logits of each running row
        self._serial_busy = False
        self._admitting = 0  # newcomers taken from the queue, not yet in _rows (their admission runs)
        self._draining = False
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._latency = 1.0  # moving average of request latency (s), for Retry-After
        self._admit_cost = 0.0  # moving average of the seconds admitting one newcomer takes
        self.counts = {"submitted": 0, "done": 0, "cancelled": 0, "timeout": 0, "error": 0}

    # -- the callers' side -------------------------------------------------------------------------
    def start(self) -> Scheduler:
        for name, target in (("blip2-batch", self._loop), ("blip2-serial", self._serial_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def check(self, prompt_ids: list[int], config: GenerationConfig) -> None:
        """Raise :class:`LimitError` when a request cannot fit a KV slot (before it is queued)."""
        need = self.rt.manifest.model.num_query_tokens + len(prompt_ids) + config.max_new_tokens
        if self.batched and not (config.num_beams > 1) and need > self.capacity:
            raise LimitError(f"{need} positions (visual tokens + prompt + max_tokens) exceed the server's KV slot "
                             f"of {self.capacity}", hint="lower max_tokens or shorten the prompt")
        if config.num_beams > 1:
            self.rt.manifest.dims["batch"].check("num_beams", config.num_beams, "--max-batch")

    def submit(self, req: Request) -> Request:
        self.check(req.prompt_ids, req.config)
        with self._cond:
            if self._draining or self._stopping:
                raise Draining("the server is shutting down and takes no new requests")
            if self.waiting >= self.config.max_queue:
                raise QueueFull(f"{self.waiting} requests are waiting (--max-queue {self.config.max_queue})",
                                retry_after=self.retry_after())
            now = time.monotonic()
            req.submitted = now
            req.expires = now + self.config.timeout if self.config.timeout else math.inf
            req.procs = processors(req.config, self.rt.manifest.model.eos_token_ids)
            req.text = TextAssembler(self.rt.tokenizer, req.stop)
            req.history = [self.rt.manifest.model.image_token_id] * self.rt.manifest.model.num_query_tokens \
                + list(req.prompt_ids)
            (self._serial if req.serial or not self.batched else self._queue).append(req)
            self.counts["submitted"] += 1
            self._cond.notify_all()
        return req

    @property
    def waiting(self) -> int:
        return len(self._queue) + len(self._serial)

    @property
    def running(self) -> int:
        return len(self._rows) + self._admitting + int(self._serial_busy)

    def retry_after(self) -> int:
        """Seconds after which a refused caller may find room: about one request's latency per batch of waiters."""
        rounds = max(1, self.waiting) / max(1, self.config.max_batch)
        return max(1, math.ceil(self._latency * rounds))

    def drain(self) -> None:
        """Take no new requests; finish those waiting and running."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    @property
    def draining(self) -> bool:
        return self._draining

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._serial and not self._rows and not self._serial_busy \
                and not self._admitting

    def close(self, timeout: float | None = None) -> None:
        """Finish what is held (see :meth:`drain`), then stop the threads; requests still held after
        ``timeout`` seconds get an error event."""
        self.drain()
        end = None if timeout is None else time.monotonic() + timeout
        while not self.idle() and (end is None or time.monotonic() < end):
            time.sleep(0.01)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=30)
        for req in [*self._queue, *self._serial, *self._rows]:
            self._finish(req, Event("error", error=Draining("the server stopped before this request finished")),
                         "error")
        self._queue.clear()
        self._serial.clear()

    # -- events ------------------------------------------------------------------------------------
    def _send(self, req: Request, event: Event) -> None:
        if req.closed:
            return
        try:
            req.on_event(event)
        except Exception:  # noqa: BLE001 - a broken listener must not stop the batch
            req.cancelled = True

    def _finish(self, req: Request, event: Event, status: str) -> None:
        if req.closed:
            return
        now = time.monotonic()
        self.counts[status] = self.counts.get(status, 0) + 1  # counted before the caller can see the answer
        if status == "done":
            self._latency = 0.8 * self._latency + 0.2 * (now - req.submitted)
        self.observer.on_finish(req, status, now)
        self._send(req, event)
        req.closed = True

    def _expired(self, req: Request, now: float) -> bool:
        """Finish ``req`` if it was cancelled or ran past its deadline; say whether it did."""
        if req.cancelled:
            self._finish(req, Event("error", error=Blip2Error("cancelled")), "cancelled")
            return True
        if now > req.expires:
            self._finish(req, Event("error", error=RequestTimeout(
                f"the request ran past the server's timeout of {self.config.timeout:g} s",
                hint="raise the server's --timeout or lower max_tokens")), "timeout")
            return True
        return False

    # -- the batch ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._rows and not self._stopping:
                    self._cond.wait(timeout=0.5)
                if self._stopping:
                    return
                self._gather()
                now = time.monotonic()
                kept = deque(r for r in self._queue if not self._expired(r, now))
                self._queue = kept
                free = self.cache.free - sum(1 for r in self._rows if r.cancelled or now > r.expires)
                take = 0 if self._hold(free, now) else min(max(free, 0), len(self._queue))
                newcomers = [self._queue.popleft() for _ in range(take)]
                self._admitting = len(newcomers)
            self._drop_finished_rows(time.monotonic())
            if newcomers:
                try:
                    self._admit(newcomers)
                except Exception as e:  # noqa: BLE001 - fail the newcomers; the running rows are untouched
                    for req in newcomers:
                        self._finish(req, Event("error", error=_as_error(e)), "error")
                finally:
                    self._admitting = 0
            if self._rows:
                try:
                    self._advance()
                except Exception as e:  # noqa: BLE001 - fail the batch's requests, keep serving
                    for req in self._rows:
                        self._finish(req, Event("error", error=_as_error(e)), "error")
                    self._rows = []
                    self._logits = None
                    self.cache.reset()

    def _wait_budget(self) -> float:
        """Seconds newcomers may wait for company (0 until an admission was measured)."""
        if self._draining:
            return 0.0
        return min(self.config.admit_window, ADMIT_WAIT_SHARE * self._admit_cost)

    def _gather(self) -> None:
        """With the batch empty, wait (bounded, holding no row) for more newcomers to join the first ones:
        until they fill the free slots, arrivals stop for a quarter of the budget, or the oldest has waited
        the whole budget. Called with ``_cond`` held."""
        budget = self._wait_budget()
        if budget <= 0 or self._rows or not self._queue:
            return
        first = self._queue[0].submitted
        while self._queue and not self._rows and not self._stopping and not self._draining \
                and len(self._queue) < self.cache.free:
            until = min(first + budget, self._queue[-1].submitted + budget / 4)
            now = time.monotonic()
            if now >= until:
                return
            self._cond.wait(until - now)

    def _hold(self, free: int, now: float) -> bool:
        """Whether the waiting newcomers wait one more decode step for company (rows are running, they do
        not fill the free slots, and the oldest has waited less than the budget)."""
        return bool(self._rows) and 0 < len(self._queue) < free and now - self._queue[0].submitted < \
            self._wait_budget()

    def _retire(self, rows: list[int]) -> None:
        for r in sorted(rows, reverse=True):
            moved = self.cache.retire(r)
            if moved is not None:
                self._rows[r] = self._rows[moved]
                self._logits[r] = self._logits[moved]
            self._rows.pop()
            self._logits = self._logits[:-1]

    def _drop_finished_rows(self, now: float) -> None:
        gone = [b for b, req in enumerate(self._rows) if self._expired(req, now) or req.closed]
        if gone:
            self._retire(gone)

    def _admit(self, newcomers: list[Request]) -> None:
        t0 = time.perf_counter()
        pv = np.concatenate([r.pixel_values for r in newcomers], axis=0)
        prefix = self.rt.image_features(pv)
        logits = self.cache.admit(prefix, [r.prompt_ids for r in newcomers])
        self._rows.extend(newcomers)
        self._admitting = 0
        self._logits = logits if self._logits is None or not len(self._logits) else np.concatenate(
            [self._logits, logits])
        seconds = time.perf_counter() - t0
        per = seconds / len(newcomers)
        self._admit_cost = per if not self._admit_cost else 0.8 * self._admit_cost + 0.2 * per
        self.observer.on_admit(len(newcomers), seconds)

    def _advance(self) -> None:
        """Choose every running row's next token, retire the finished rows, run one decode step for the rest."""
        now = time.monotonic()
        tokens = np.zeros(len(self._rows), dtype=np.int64)
        done: list[int] = []
        for b, req in enumerate(self._rows):
            t = int(req.procs.choose(self._logits[b:b + 1], [req.history], len(req.tokens))[0])
            tokens[b] = t
            req.tokens.append(t)
            req.history.append(t)
            if req.first_token is None:
                req.first_token = now
            piece, hit = req.text.update(req.tokens) if req.stream or req.stop else ("", False)
            if req.stream:
                self._send(req, Event("token", text=piece, token_id=t))
            if t in req.procs.stop or hit or len(req.tokens) >= req.config.max_new_tokens:
                self._complete(req, "stop" if t in req.procs.stop or hit else "length")
            if req.closed or self._expired(req, now):
                done.append(b)
        keep = np.ones(len(self._rows), dtype=bool)
        keep[done] = False
        self._retire(done)
        tokens = self._compact(tokens, keep)
        if self._rows:
            t0 = time.perf_counter()
            self._logits = self.cache.step(tokens)
            self.observer.on_step(len(self._rows), time.perf_counter() - t0)

    def _compact(self, values: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """``values`` per row, reordered the way :meth:`_retire` moved the rows (last row into each hole)."""
        values = values.copy()
        n = len(values)
        for r in sorted(np.flatnonzero(~keep), reverse=True):
            last = n - 1
            if r != last:
                values[r] = values[last]
            n -= 1
        return values[:n]

    def _complete(self, req: Request, reason: str) -> None:
        text, piece = req.text.final(req.tokens)
        if piece and req.stream:
            self._send(req, Event("token", text=piece))
        self._finish(req, Event("done", text=text, finish_reason=reason, token_ids=list(req.tokens)), "done")

    # -- the serial lane (beam search; encoder-decoder bundles) -------------------------------------
    def _serial_loop(self) -> None:
        while True:
            with self._cond:
                while not self._serial and not self._stopping:
                    self._cond.wait(timeout=0.5)
                if self._stopping:
                    return
                req = self._serial.popleft()
                if self._expired(req, time.monotonic()):
                    continue
                self._serial_busy = True
            try:
                self._run_serial(req)
            finally:
                with self._cond:
                    self._serial_busy = False

    def _run_serial(self, req: Request) -> None:
        class _Stop(Exception):
            pass

        def stream(step, tokens):
            if req.cancelled or time.monotonic() > req.expires:
                raise _Stop
            if tokens[0] is not None:
                req.tokens.append(int(tokens[0]))
                if req.first_token is None:
                    req.first_token = time.monotonic()
                piece, hit = req.text.update(req.tokens)
                if req.stream:
                    self._send(req, Event("token", text=piece, token_id=int(tokens[0])))
                if hit:
                    raise _Stop

        remaining = req.expires - time.monotonic()
        try:
            with deadline(remaining if math.isfinite(remaining) else None):
                out = self.rt.generate(req.pixel_values, [req.prompt], req.config,
                                       stream=None if req.serial else stream)[0]
            req.tokens = list(out.token_ids)
            if req.first_token is None:
                req.first_token = time.monotonic()
            self._complete(req, "stop" if out.finished else "length")
        except _Stop:
            if not self._expired(req, time.monotonic()):
                self._complete(req, "stop")
        except LimitError as e:
            if time.monotonic() > req.expires:
                self._expired(req, time.monotonic())
            else:
                self._finish(req, Event("error", error=e), "error")
        except Exception as e:  # noqa: BLE001 - one failed request must not stop the lane
            self._finish(req, Event("error", error=_as_error(e)), "error")
