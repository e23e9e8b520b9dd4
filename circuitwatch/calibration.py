"""Measuring an SAE's fidelity baseline on calibration text with a Hugging Face model: shared by `circuitwatch
calibrate`, the fixture build (which calibrates its SAEs the way a deployment would) and bench/drift_bench.py.

The model runs in transformers, independent of vLLM, read at the slot's tap (fixtures/activations.py). Codes
are selected exactly as the plugin selects them, because the error that matters is that of the codes the
monitor emits.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from circuitwatch.fixtures.activations import activations_at
from circuitwatch.fixtures.corpus import documents as built_in_documents
from circuitwatch.kernels import ReferenceEncoder as Encoder
from circuitwatch.kernels.baseline import FidelityBaseline, measure, model_fingerprint
from circuitwatch.kernels.hook_points import Tap
from circuitwatch.kernels.spec import Sae

# The built-in calibration text: CPython's help topics, English technical prose that ships with every Python
# (no download, identical on every machine). The fixture model learnt exactly this text.
BUILT_IN_SAMPLE = "CPython help topics (built-in sample)"
__all__ = ["BUILT_IN_SAMPLE", "built_in_documents", "calibrate", "read_documents"]


def read_documents(
    model: Any, tokenizer: Any, encoder: Encoder, tap: Tap, documents: list[str], tokens_per_document: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each document alone through the model (its first `tokens_per_document` tokens), its activations at `tap`
    encoded: (errors, norms, L0 per readable token, the feature ids of every code)."""
    device = next(model.parameters()).device
    errors, norms, l0, features = [], [], [], []
    for text in documents:
        encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=tokens_per_document)
        hidden = activations_at(model, encoded.input_ids.to(device), [tap])[tap][0]
        codes = encoder.encode(hidden)
        valid = codes.valid.cpu().numpy()
        ids = codes.ids.cpu().numpy()[valid]
        errors.append(codes.errors.cpu().numpy()[valid])
        norms.append(codes.norms.cpu().numpy()[valid])
        l0.append((ids >= 0).sum(axis=1))
        features.append(ids[ids >= 0])
    return tuple(np.concatenate(part) for part in (errors, norms, l0, features))  # type: ignore[return-value]


def calibrate(
    model: Any,
    tokenizer: Any,
    sae: Sae,
    encoder: Encoder,
    tap: Tap,
    documents: list[str],
    tokens_per_document: int = 128,
    *,
    model_name: str,
    text: str = BUILT_IN_SAMPLE,
) -> FidelityBaseline:
    """The SAE's baseline at `tap` on `documents`, pinned to the SAE, the tap and the model's architecture."""
    errors, norms, l0, features = read_documents(model, tokenizer, encoder, tap, documents, tokens_per_document)
    return measure(
        errors,
        norms,
        l0,
        features,
        sae.spec.d_sae,
        sae_name=sae.name,
        weights_hash=sae.weights_hash,
        decoder_hash=sae.decoder_hash,
        model=model_name,
        model_fingerprint=model_fingerprint(model.config.to_dict()),
        layer=tap.layer,
        hook_point=str(tap.hook_point),
        head=tap.head,
        selection=encoder.selection.describe(),
        text=text,
        documents=len(documents),
    )
