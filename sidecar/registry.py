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
        )

    def to_proto(self, slot: int) -> pb.SaeSlot:
        return pb.SaeSlot(
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

    def matches(self, selector: str | None) -> bool:
        """An SAE pin matches the name, or a prefix of the weights hash (with or without 'blake2b:')."""
        if not selector:
            return True
        bare = self.weights_hash.split(":", 1)[-1]
        return selector == self.name or self.weights_hash.startswith(selector) or bare.startswith(selector)


class SaeRegistry:
    """Every distinct SAE identity seen on any stream, numbered in registration order (its gslot). Append-only,
    so a gslot and its term base never change while the sidecar runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_identity: dict[SaeIdentity, int] = {}
        self.identities: list[SaeIdentity] = []
        self.producer_slot: list[int] = []
        # Dense "term ids" for the request-level index: gslot g's features are term_bases[g] + feature.
        self.term_bases: list[int] = []
        self.num_terms = 0

    def register(self, identity: SaeIdentity, producer_slot: int) -> int:
        with self._lock:
            if identity not in self._by_identity:
                if len(self.identities) >= MAX_GSLOTS:
                    raise ValueError(f"more than {MAX_GSLOTS} distinct SAEs registered")
                self._by_identity[identity] = len(self.identities)
                self.identities.append(identity)
                self.producer_slot.append(producer_slot)
                self.term_bases.append(self.num_terms)
                self.num_terms += identity.d_sae
            return self._by_identity[identity]

    def resolve(self, term: Term, among: list[int] | None = None) -> list[int]:
        """gslots a term refers to, optionally only among some (a request's own slots)."""
        candidates = range(len(self.identities)) if among is None else among
        found = []
        for gslot in candidates:
            identity = self.identities[gslot]
            if term.slot is not None and self.producer_slot[gslot] != term.slot:
                continue
            if term.layer is not None and identity.layer != term.layer:
                continue
            if identity.matches(term.sae):
                found.append(gslot)
        return found
