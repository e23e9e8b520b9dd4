"""Every SAE the sidecar has seen, across producers: codes of two SAE versions are never mixed.

Producers number their slots locally; the sidecar maps each (SAE identity) to one global slot ("gslot") and
keeps, per producer stream, producer slot -> gslot.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from circuitwatch.proto import circuitwatch_pb2 as pb

from .expressions import Term

MAX_GSLOTS = 1 << 12  # the index packs gslots into 12 bits


@dataclass(frozen=True)
class SaeIdentity:
    """What makes two SAE slots the same SAE: equal identities share a gslot, and so their codes."""

    name: str
    architecture: str
    layer: int
    hook_point: str
    d_in: int
    d_sae: int
    weights_hash: str
    selection: str
    source_format: str
    head: int | None = None  # attn_z of one head

    @classmethod
    def from_proto(cls, slot: pb.SaeSlot) -> SaeIdentity:
        return cls(
            name=slot.name,
            architecture=slot.architecture,
            layer=slot.layer,
            hook_point=slot.hook_point,
            d_in=slot.d_in,
            d_sae=slot.d_sae,
            weights_hash=slot.weights_hash,
            selection=slot.selection,
            source_format=slot.source_format,
            head=slot.head if slot.HasField("head") else None,
        )

    def to_proto(self, slot: int) -> pb.SaeSlot:
        proto = pb.SaeSlot(
            slot=slot,
            name=self.name,
            architecture=self.architecture,
            layer=self.layer,
            hook_point=self.hook_point,
            d_in=self.d_in,
            d_sae=self.d_sae,
            weights_hash=self.weights_hash,
            selection=self.selection,
            source_format=self.source_format,
        )
        if self.head is not None:
            proto.head = self.head
        return proto

    def matches(self, selector: str | None) -> bool:
        """An SAE pin matches the name, or a prefix of the weights hash (with or without 'blake2b:')."""
        if not selector:
            return True
        bare = self.weights_hash.split(":", 1)[-1]
        return selector == self.name or self.weights_hash.startswith(selector) or bare.startswith(selector)


class SaeRegistry:
    """Every distinct SAE identity seen on any stream, numbered (its gslot). A gslot and its term range never
    change once codes have used them. An SAE that only ever appeared in manifests (no stream sent anything for
    it) is retired when its last stream closes, and its gslot and term range are reused: a producer cannot
    fill the registry with junk manifests."""

    def __init__(self, max_gslots: int = MAX_GSLOTS, max_total_features: int = 1 << 22) -> None:
        self._lock = threading.Lock()
        self.max_gslots = max_gslots
        self.max_total_features = max_total_features
        self._by_identity: dict[SaeIdentity, int] = {}
        self.identities: list[SaeIdentity] = []
        self.producer_slot: list[int] = []
        # Dense "term ids" for the request-level index: gslot g's features are term_bases[g] + feature.
        self.term_bases: list[int] = []
        self.num_terms = 0
        self._capacity: list[int] = []  # size of each gslot's term range
        self._holders: list[int] = []  # open streams whose manifest names it
        self._used: list[bool] = []  # some stream sent more than its manifest
        self._retired: list[bool] = []

    def register(self, identity: SaeIdentity, producer_slot: int) -> int:
        """The gslot of an SAE a stream's manifest names (the stream holds it until release)."""
        with self._lock:
            gslot = self._by_identity.get(identity)
            if gslot is None:
                gslot = self._allocate(identity, producer_slot)
            self._holders[gslot] += 1
            return gslot

    def _allocate(self, identity: SaeIdentity, producer_slot: int) -> int:
        fitting = [g for g, retired in enumerate(self._retired) if retired and self._capacity[g] >= identity.d_sae]
        if fitting:
            gslot = min(fitting, key=lambda g: self._capacity[g])
        else:
            if self.num_terms + identity.d_sae > self.max_total_features:
                raise ValueError(
                    f"registering d_sae {identity.d_sae} would take the features of all registered SAEs past "
                    f"limits.max_total_features ({self.max_total_features})"
                )
            reusable = [g for g, retired in enumerate(self._retired) if retired]
            if reusable:
                gslot = reusable[0]
            elif len(self.identities) >= self.max_gslots:
                raise ValueError(f"more than {self.max_gslots} distinct SAEs registered")
            else:
                gslot = len(self.identities)
                for column, value in ((self.identities, None), (self.producer_slot, 0), (self.term_bases, 0)):
                    column.append(value)
                for column, value in ((self._capacity, 0), (self._holders, 0), (self._used, False)):
                    column.append(value)
                self._retired.append(False)
            self.term_bases[gslot] = self.num_terms
            self._capacity[gslot] = identity.d_sae
            self.num_terms += identity.d_sae
        self.identities[gslot] = identity
        self.producer_slot[gslot] = producer_slot
        self._retired[gslot] = False
        self._used[gslot] = False
        self._by_identity[identity] = gslot
        return gslot

    def mark_used(self, gslots) -> None:
        """A stream sent more than its manifest: these SAEs may now be referenced anywhere; never reused."""
        with self._lock:
            for gslot in gslots:
                self._used[gslot] = True

    def release(self, gslots) -> int:
        """A stream closed; SAEs no open stream names and nothing ever used are retired. Returns how many."""
        retired = 0
        with self._lock:
            for gslot in gslots:
                self._holders[gslot] -= 1
                if self._holders[gslot] == 0 and not self._used[gslot]:
                    del self._by_identity[self.identities[gslot]]
                    self._retired[gslot] = True
                    retired += 1
        return retired

    def live(self) -> list[int]:
        """Every gslot that is not retired."""
        return [g for g, retired in enumerate(self._retired) if not retired]

    def resolve(self, term: Term, among: list[int] | None = None) -> list[int]:
        """gslots a term refers to, optionally only among some (a request's own slots)."""
        candidates = self.live() if among is None else among
        found = []
        for gslot in candidates:
            identity = self.identities[gslot]
            if term.slot is not None and self.producer_slot[gslot] != term.slot:
                continue
            if term.layer is not None and identity.layer != term.layer:
                continue
            if term.hook_point is not None and (identity.hook_point or "resid_post") != term.hook_point:
                continue
            if term.head is not None and identity.head != term.head:
                continue
            if identity.matches(term.sae):
                found.append(gslot)
        return found
