"""Background emitter: streams manifest, code batches and finish markers to the sidecar over gRPC.

Nothing on vLLM's step path waits for the network: `submit` is a non-blocking enqueue. The queue is bounded
in code batches; when full, the oldest batch is dropped and its rows become gaps (back-pressure, or
sidecar-unavailable while disconnected), sent as RequestGaps ahead of anything queued later, so the sidecar
reports them instead of calling those tokens clean. Control messages (starts, finishes, gaps) are never
dropped. Code batches that queued up behind each other (the sidecar or the stream slower than the engine for a
while) go as one message, each request's rows of a slot joined into one slice: the sidecar catches up several
times faster than with a message per step, and no batch waits for another to be made. A failed stream is
reopened with exponential back-off and begins again with the manifest, then with what the sidecar may have lost
with the old stream (resend.py). Where vLLM's engine core runs in the same process (one GPU: the uni-process
executor), finish markers share this stream and ride in the code batch of the step that finished their requests
(engine_step_done), so the sidecar finalises them before that step's other slices; only for a sidecar that
announced it reads them (contract 6, in the call's initial metadata). There, and only there, a code batch may also
wait a while (linger_s, the plugin's coalesce_linger_ms) for the steps behind it, so that the sidecar gets fewer,
larger messages at any load: the wait ends at once at a step that finished requests, so no report waits for it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import grpc

from circuitwatch.proto import CONTRACT_VERSION_METADATA, FINISHES_IN_BATCHES_SINCE
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc
from circuitwatch.proto.client import Backoff, bearer_metadata, open_channel, read_token
from circuitwatch.proto.codec import join_slices

from .config import SidecarTarget
from .resend import ResendLog

log = logging.getLogger(__name__)

# Code batches queued behind each other (the sidecar or the stream slower than the engine for a while) go as one
# message of at most this many engine steps and rows (a row: one position in one slot): a few MB at k = 64.
COALESCE_MAX_STEPS = 16
COALESCE_MAX_ROWS = 8192
# ... and of at most this many bytes of codes plus one step's (well under the sidecar's max_message_bytes, 16 MiB
# by default, however many codes a token has).
COALESCE_MAX_BYTES = 4 << 20


def batches_to_join(rows_per_batch: Iterable[int]) -> int:
    """How many of the code batches queued at the head (their rows, in queue order) go in one message: the first,
    and those behind it while the message stays within COALESCE_MAX_STEPS batches and COALESCE_MAX_ROWS rows.
    Pure, so that the bench coalesces its traffic exactly as the emitter does."""
    taken = total = 0
    for rows in rows_per_batch:
        total += rows
        if taken and (taken == COALESCE_MAX_STEPS or total > COALESCE_MAX_ROWS):
            break
        taken += 1
    return taken


# With vLLM's engine core in this process, the longest a built code batch waits for the end of its engine step,
# so that it can carry the finish markers of the requests that step finished.
ENGINE_STEP_WAIT_S = 0.01


# With a linger set, how many code batches go without it (finish markers not in batches) before the log says so.
LINGER_UNAVAILABLE_LOGGED_AFTER = 100


@dataclass
class BuiltBatch:
    """What a deferred build makes: the batch's slices, and gaps it found while packing (unreadable rows)."""

    slices: list[pb.RequestSlice]
    gaps: dict[str, list[pb.Gap]] = field(default_factory=dict)


@dataclass
class _Item:
    message: pb.IngestMessage | None
    # (request_id, slot, first_position, end_position) of every slice, to turn a dropped batch into gaps
    ranges: list[tuple[str, int, int, int]] = field(default_factory=list)
    # deferred code batches: built by the sending thread (waits for device copies, packs bytes)
    build: Callable[[], BuiltBatch] | None = None
    step: int = 0
    engine_steps_done: int = 0  # engine steps finished when the batch was submitted (ENGINE_STEP_WAIT_S)
    submitted: float = 0.0  # time.monotonic() at submit: a lingering message's deadline counts from its first
    step_end_awaited: bool = False  # the end of its engine step came, or was waited for in vain

    @property
    def droppable(self) -> bool:
        """Only code batches are dropped under back-pressure (submit() queues starts and finishes)."""
        return self.build is not None

    @property
    def is_finish(self) -> bool:
        return self.message is not None and self.message.WhichOneof("kind") == "finish"


def _rows(item: _Item) -> int:
    return sum(end - start for _, _, start, end in item.ranges)


def _wire_bytes(piece: pb.RequestSlice) -> int:
    return (
        len(piece.token_ids)
        + len(piece.row_offsets)
        + len(piece.feature_ids)
        + len(piece.activations)
        + len(piece.reconstruction_errors)
        + len(piece.input_norms)
    )


class Emitter:
    """One producer stream to the sidecar, fed from a bounded queue by the step path and drained by a daemon
    thread that (re)connects, sends the manifest first, and turns what it cannot send into gaps."""

    def __init__(self, target: SidecarTarget, manifest: pb.Manifest, max_batches: int, linger_s: float = 0.0) -> None:
        self.target = target
        self.manifest = manifest
        self.max_batches = max_batches
        # the longest a code batch waits for the steps behind it (_linger); 0: it goes as soon as it is built
        self.linger_s = linger_s
        self.counters: Counter[str] = Counter()
        self.connected = False
        self._queue: deque[_Item] = deque()
        self._batches_queued = 0
        self._pending_gaps: dict[str, list[pb.Gap]] = {}
        self._cv = threading.Condition()
        self._stopping = False
        self._step = 0
        # counted by the engine core when it runs in this process (engine_step_done); None: it does not
        self._engine_steps_done: int | None = None
        self._sidecar_contract = 0  # the connected sidecar's CONTRACT_VERSION, once it announced it
        self.resend = ResendLog(self.counters)
        self.wiring: dict[int, pb.WiringCheck] = {}  # slot -> start-up wiring verdict (set on the sending thread)
        self._thread = threading.Thread(target=self._run, name="circuitwatch-emitter", daemon=True)
        self._thread.start()

    # --- producer side (vLLM's step path): never blocks on the network --------------------------------

    def submit_deferred(self, build: Callable[[], BuiltBatch], ranges: list[tuple[str, int, int, int]]) -> None:
        """A code batch whose slices `build` makes later, on the sending thread: the step path only enqueues.

        `ranges` (request, slot, first, end) say what the batch covers, so dropping it still reports the gap.
        """
        if not ranges:
            return
        with self._cv:
            self._step += 1
            engine_steps = self._engine_steps_done or 0
            item = _Item(
                None, ranges, build=build, step=self._step, engine_steps_done=engine_steps, submitted=time.monotonic()
            )
            self._queue.append(item)
            self._batches_queued += 1
            while self._batches_queued > self.max_batches:
                self._drop_oldest_batch()
            self._cv.notify()

    def submit(self, message: pb.IngestMessage) -> None:
        """A start or finish marker: always kept (and remembered for a resend after a reconnect)."""
        with self._cv:
            if message.HasField("start"):
                self.resend.started(message.start)
            self._queue.append(_Item(message))
            self._cv.notify()

    def engine_step_done(self) -> None:
        """vLLM's engine core, in this process, finished a step and submitted the finish markers it made. From the
        first call on, a code batch waits (up to ENGINE_STEP_WAIT_S) for the end of the step that made it and
        carries the finish markers queued behind it: the sidecar then finalises those requests before the step's
        other slices, instead of after the whole step."""
        with self._cv:
            self._engine_steps_done = (self._engine_steps_done or 0) + 1
            self._cv.notify_all()

    def forget(self, request_id: str) -> None:
        """The request is over for this producer; its start is kept for a resend a little longer."""
        with self._cv:
            self.resend.forgotten(request_id, time.monotonic())

    @property
    def sidecar_contract(self) -> int:
        """The connected sidecar's contract version, once it announced it (0 until then, or from an old one)."""
        return self._sidecar_contract

    @property
    def queue_depth(self) -> int:
        return self._batches_queued

    def stats(self) -> pb.ProducerStats:
        return pb.ProducerStats(
            queue_depth=self._batches_queued,
            batches_dropped=self.counters["batches_dropped"],
            rows_dropped=self.counters["rows_dropped"],
            steps_encoded=self.counters["steps_encoded"],
            encode_ns=self.counters["encode_ns"],
            engine_step_wait_timeouts=self.counters["engine_step_waits_timed_out"],
            steps_coalesced=self.counters["steps_coalesced"],
            wiring=list(self.wiring.values()),
        )

    def _report_lost(self, item: _Item, reason: int) -> None:
        """The item's rows become gaps, sent ahead of anything queued later (the lock is re-entrant)."""
        with self._cv:
            for request_id, slot, start, end in item.ranges:
                gap = pb.Gap(slot=slot, start=start, end=end, reason=reason)
                self._pending_gaps.setdefault(request_id, []).append(gap)
                self.counters["rows_dropped"] += end - start

    def _drop_oldest_batch(self) -> None:
        for i, item in enumerate(self._queue):
            if item.droppable:
                del self._queue[i]
                self._batches_queued -= 1
                reason = pb.GAP_REASON_BACKPRESSURE if self.connected else pb.GAP_REASON_SIDECAR_UNAVAILABLE
                self._report_lost(item, reason)
                self.counters["batches_dropped"] += 1
                return

    # --- the sending thread ---------------------------------------------------------------------------

    def _messages(self, done: threading.Event) -> Iterator[pb.IngestMessage]:
        yield pb.IngestMessage(manifest=self.manifest)
        with self._cv:
            replay = self.resend.replay(time.monotonic())
        yield from replay
        while True:
            with self._cv:
                while not self._queue and not self._pending_gaps and not self._stopping and not done.is_set():
                    self._cv.wait(0.1)
                if done.is_set() or (self._stopping and not self._queue and not self._pending_gaps):
                    return
                if self._pending_gaps:  # gaps go before anything queued after the drop
                    request_id, gaps = self._pending_gaps.popitem()
                    message = pb.IngestMessage(gaps=pb.RequestGaps(request_id=request_id, gaps=gaps))
                else:
                    run = self._next_run()
                    message = None
                    if run[0].build is not None and self.linger_s > 0:
                        run = self._linger(run, done)
                        if run is None:  # the stream ended while the run waited: it is back in the queue
                            return
            if message is None and run[0].build is None:
                message = run[0].message
            elif message is None:
                message = self._built_message(run)
                if message is None:
                    continue
            self.counters[f"sent_{message.WhichOneof('kind')}"] += 1
            with self._cv:
                self.resend.sent(message, time.monotonic())
            yield message

    def _next_run(self) -> list[_Item]:
        """The queue's next item; for a code batch, with the code batches queued right behind it (under the lock).

        Batches queue up only while the sidecar or the stream is slower than the engine: sending them as one
        message (each request's rows of a slot joined into one slice) lets the sidecar catch up several times
        faster than a message per step would, and delays nothing, since all of them are ready. Anything else in
        the queue ends the run: a start goes before the codes behind it, and finish markers go with the batch
        before them (in it, where they ride in code batches), so a finished request's report never waits for the
        codes of later steps. Bounded as batches_to_join says."""
        if self._queue[0].build is None:
            return [self._queue.popleft()]
        batches = itertools.takewhile(lambda item: item.build is not None, self._queue)
        run = [self._queue.popleft() for _ in range(batches_to_join(_rows(item) for item in batches))]
        self._batches_queued -= len(run)
        return run

    def _linger(self, run: list[_Item], done: threading.Event) -> list[_Item] | None:
        """The run, grown by the code batches of the engine steps made within linger_s of its first batch's submit
        (under the lock). It ends at once at a step that finished requests (their finish markers are queued behind
        its batch when the step is over: they ride in this message, so no report waits for the linger), at
        anything else queued (a start, gaps), at the bounds of batches_to_join, and when the emitter stops. Only
        where finish markers ride in code batches (the engine core in this process, a sidecar reading contract 6);
        elsewhere the emitter cannot tell a finishing step, and a report would wait, so the run goes as it is.
        None: the stream ended meanwhile, and the run went back to the head of the queue."""
        if not self._finishes_ride_in_batches():
            # the first batches go before the first engine step ends or the sidecar announces its contract: say so
            # only once it is clearly lasting
            self.counters["linger_unavailable"] += 1
            if self.counters["linger_unavailable"] == LINGER_UNAVAILABLE_LOGGED_AFTER:
                log.warning(
                    "circuitwatch: coalesce_linger_ms has no effect: finish markers do not ride in code batches "
                    "(vLLM's engine core runs in another process, or the sidecar has not announced contract %d), "
                    "so a lingering batch would delay reports; batches go as soon as they are built",
                    FINISHES_IN_BATCHES_SINCE,
                )
            return run
        deadline = run[0].submitted + self.linger_s
        while True:
            self._await_step_end(run[-1])  # once per batch: a no-op when the loop comes back after a wait
            if done.is_set():
                self._requeue(run)
                return None
            if self._stopping or (self._queue and self._queue[0].is_finish):
                return run
            left = deadline - time.monotonic()
            if not self._queue and not self._pending_gaps and left > 0:
                self._cv.wait(left)  # woken by a submit, a gap, close() or the stream's end (_run)
                continue
            if self._pending_gaps or not self._queue or self._queue[0].build is None:
                return run
            if batches_to_join(_rows(item) for item in [*run, self._queue[0]]) <= len(run):
                return run
            run.append(self._queue.popleft())
            self._batches_queued -= 1
            self.counters["steps_lingered"] += 1

    def _finishes_ride_in_batches(self) -> bool:
        """The engine core runs in this process and the connected sidecar announced it reads finish markers inside
        code batches (under the lock)."""
        return self._engine_steps_done is not None and self._sidecar_contract >= FINISHES_IN_BATCHES_SINCE

    def _requeue(self, run: list[_Item]) -> None:
        """Put a run back at the head of the queue, in order (under the lock)."""
        self._queue.extendleft(reversed(run))
        self._batches_queued += len(run)

    def _await_step_end(self, item: _Item) -> None:
        """Wait (under the lock, ENGINE_STEP_WAIT_S at most, once per batch) for the end of the engine step that made
        the batch: then the finish markers of the requests it finished are queued right behind it."""
        if item.step_end_awaited or self._engine_steps_done is None:
            return
        item.step_end_awaited = True
        deadline = time.monotonic() + ENGINE_STEP_WAIT_S
        while self._engine_steps_done <= item.engine_steps_done and not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                self.counters["engine_step_waits_timed_out"] += 1
                return
            self._cv.wait(left)

    def _built_message(self, run: list[_Item]) -> pb.IngestMessage | None:
        """Build the run's code batches (outside the lock: may wait for device copies) into one CodeBatch; a batch
        that fails to build has its rows reported as gaps. Once the codes built pass COALESCE_MAX_BYTES, the
        rest of the run goes back to the head of the queue. None: nothing was built."""
        slices: list[pb.RequestSlice] = []
        size = 0
        for index, item in enumerate(run):
            if index and size > COALESCE_MAX_BYTES:
                with self._cv:
                    self._requeue(run[index:])
                break
            taken = index + 1
            try:
                built = item.build()
            except Exception:
                log.exception("circuitwatch: building a code batch failed; its rows are reported as gaps")
                self._report_lost(item, pb.GAP_REASON_ENCODER_ERROR)
                continue
            slices.extend(built.slices)
            size += sum(_wire_bytes(piece) for piece in built.slices)
            if built.gaps:
                with self._cv:
                    for request_id, gaps in built.gaps.items():
                        self._pending_gaps.setdefault(request_id, []).extend(gaps)
        self.counters["steps_coalesced"] += taken - 1
        if not slices:
            return None  # the finish markers behind go on their own, after the gaps
        if taken > 1:
            slices = join_slices(slices)
        last = run[taken - 1]
        batch = pb.CodeBatch(step=last.step, slices=slices, stats=self.stats())
        batch.finishes.extend(self._finishes_of_step(last))
        return pb.IngestMessage(codes=batch)

    def _finishes_of_step(self, item: _Item) -> list[pb.RequestFinish]:
        """With the engine core in this process: the finish markers queued right behind the batch once the engine
        step that made it is over (waited for up to ENGINE_STEP_WAIT_S); they leave the queue with the batch."""
        with self._cv:
            if not self._finishes_ride_in_batches():
                return []
            self._await_step_end(item)
            finishes = []
            while self._queue and self._queue[0].is_finish:
                finishes.append(self._queue.popleft().message.finish)
            self.counters["finishes_in_batches"] += len(finishes)
            return finishes

    def _learn_contract(self, call: grpc.Future) -> None:
        """The sidecar's contract version, from the Ingest call's initial metadata (a sidecar older than
        FINISHES_IN_BATCHES_SINCE sends none: this thread then waits until the stream ends)."""
        try:
            announced = dict(call.initial_metadata() or ()).get(CONTRACT_VERSION_METADATA, "")
        except Exception:  # the stream failed first; _run counts that
            return
        with self._cv:
            self._sidecar_contract = int(announced) if announced.isdigit() else 0

    def _run(self) -> None:
        backoff = Backoff(self.target.reconnect_min_s, self.target.reconnect_max_s)
        while True:
            with self._cv:
                if self._stopping and not self._queue and not self._pending_gaps:
                    return
            done = threading.Event()
            channel = open_channel(self.target.address, self.target.tls_ca_file)
            try:
                # Open a stream only on a ready channel, so nothing leaves the queue while the sidecar is down.
                grpc.channel_ready_future(channel).result(timeout=max(backoff.current, 2.0))
                stub = pb_grpc.MonitorStub(channel)
                self.connected = True
                metadata = bearer_metadata(read_token(self.target.auth_token_file))
                with self._cv:
                    self._sidecar_contract = 0  # until this stream's sidecar announces its own
                call = stub.Ingest.future(self._messages(done), metadata=metadata)
                threading.Thread(
                    target=self._learn_contract, args=(call,), name="circuitwatch-emitter-contract", daemon=True
                ).start()
                call.result()
                backoff.reset()
            except grpc.RpcError as exc:
                self.counters["stream_failures"] += 1
                if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED):
                    log.error("sidecar rejected the code stream: %s: %s", exc.code().name, exc.details())
                else:
                    log.warning(
                        "sidecar at %s unavailable (%s); retrying in %.1fs",
                        self.target.address,
                        exc.code().name,
                        backoff.current,
                    )
            except grpc.FutureTimeoutError:
                self.counters["connect_failures"] += 1
                if self.counters["connect_failures"] in (1, 10) or self.counters["connect_failures"] % 100 == 0:
                    log.warning(
                        "sidecar at %s not reachable; codes queue up to %d batches",
                        self.target.address,
                        self.max_batches,
                    )
            except Exception:  # never let the emitter thread die
                log.exception("circuitwatch emitter failed; reconnecting")
            finally:
                self.connected = False
                done.set()
                with self._cv:
                    self._cv.notify_all()  # a run lingering for later steps goes back to the queue (_linger)
                channel.close()
            with self._cv:
                if self._stopping:
                    self._drop_all()
                    return
            time.sleep(backoff.next())

    def _drop_all(self) -> None:
        self.counters["dropped_at_shutdown"] += len(self._queue)
        self._queue.clear()
        self._batches_queued = 0

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush what is queued (up to the timeout), then stop."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout_s)
