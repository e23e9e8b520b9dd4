"""What a producer re-announces after it reconnects to the sidecar, so no request ends as "never seen".

A sidecar that restarts loses what it held in memory for open requests: their starts (labels, trace context),
the codes it had received, and finish markers it had not acted on yet. The producer cannot know which of its
messages were lost with it, so after every reconnect it announces again, compactly:

- for each request it started and has not forgotten (or forgot less than `window_s` ago): its start, marked
  `resumed`, with SIDECAR_UNAVAILABLE gaps over the positions it had already sent per slot;
- each finish marker it sent less than `window_s` ago (on its own or inside a code batch).

A sidecar that still holds the request (or its final report) ignores both; one that lost it starts the request
from the resumed start and reports the lost positions as gaps instead of calling them clean. Records are
bounded (`limit`); past the bound the oldest go first and are counted.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from circuitwatch.proto import circuitwatch_pb2 as pb


@dataclass
class _Started:
    start: pb.RequestStart
    sent: bool = False
    positions: dict[int, tuple[int, int]] = field(default_factory=dict)  # slot -> [first, end) sent
    forgotten_at: float | None = None


class ResendLog:
    """Not thread-safe on its own: the emitter calls it under its lock."""

    def __init__(self, counters: Counter[str], window_s: float = 30.0, limit: int = 4096) -> None:
        self.window_s = window_s
        self.limit = limit
        self._counters = counters
        self._started: OrderedDict[str, _Started] = OrderedDict()
        self._finishes: OrderedDict[str, tuple[pb.RequestFinish, float]] = OrderedDict()

    def started(self, start: pb.RequestStart) -> None:
        self._started[start.request_id] = _Started(start)
        self._bound(self._started)

    def forgotten(self, request_id: str, now: float) -> None:
        record = self._started.get(request_id)
        if record is not None:
            record.forgotten_at = now

    def sent(self, message: pb.IngestMessage, now: float) -> None:
        kind = message.WhichOneof("kind")
        if kind == "codes":
            for piece in message.codes.slices:
                record = self._started.get(piece.request_id)
                if record is not None and piece.num_rows:
                    first, end = piece.first_position, piece.first_position + piece.num_rows
                    known = record.positions.get(piece.slot)
                    record.positions[piece.slot] = (min(first, known[0]), max(end, known[1])) if known else (first, end)
            for finish in message.codes.finishes:
                self._finished(finish, now)
        elif kind == "start":
            record = self._started.get(message.start.request_id)
            if record is not None:
                record.sent = True
        elif kind == "finish":
            self._finished(message.finish, now)

    def _finished(self, finish: pb.RequestFinish, now: float) -> None:
        self._finishes[finish.request_id] = (finish, now)
        self._finishes.move_to_end(finish.request_id)
        self._bound(self._finishes)

    def replay(self, now: float) -> list[pb.IngestMessage]:
        """What to send again, first thing on a new stream (after the manifest)."""
        self._expire(now)
        messages = []
        for record in self._started.values():
            if not record.sent:  # still queued: it goes out in order anyway
                continue
            start = pb.RequestStart()
            start.CopyFrom(record.start)
            start.resumed = True
            for slot, (first, end) in sorted(record.positions.items()):
                start.gaps.add(slot=slot, start=first, end=end, reason=pb.GAP_REASON_SIDECAR_UNAVAILABLE)
            messages.append(pb.IngestMessage(start=start))
        messages += [pb.IngestMessage(finish=finish) for finish, _ in self._finishes.values()]
        self._counters["resent_starts"] += sum(1 for m in messages if m.HasField("start"))
        self._counters["resent_finishes"] += len(self._finishes)
        return messages

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        for request_id in [
            r for r, s in self._started.items() if s.forgotten_at is not None and s.forgotten_at < horizon
        ]:
            del self._started[request_id]
        while self._finishes and next(iter(self._finishes.values()))[1] < horizon:
            self._finishes.popitem(last=False)

    def _bound(self, records: OrderedDict) -> None:
        while len(records) > self.limit:
            records.popitem(last=False)
            self._counters["resend_records_dropped"] += 1

    def __len__(self) -> int:
        return len(self._started) + len(self._finishes)
