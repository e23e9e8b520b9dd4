"""`circuitwatch calibrate`: measure how well an SAE reads calibration text on its model, and write the
baseline next to the SAE (kernels/baseline.py; the measurement is circuitwatch/calibration.py).

Without --text, the built-in sample is CPython's help topics; calibrate on text like your traffic. The selection
options are the slot's, because the error is that of the codes the monitor emits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from circuitwatch.kernels.hook_points import HOOK_POINTS

from .connection import UsageError

SELECTIONS = ("default", "topk", "threshold", "argmax")


def add_calibrate_parser(sub) -> None:
    parser = sub.add_parser("calibrate", help="measure an SAE's fidelity on calibration text; write its baseline")
    parser.add_argument("--model", required=True, help="Hugging Face model directory (the model vLLM serves)")
    parser.add_argument("--sae", type=Path, required=True, help="SAE directory or file")
    parser.add_argument("--layer", type=int, required=True, help="the slot's decoder layer")
    parser.add_argument(
        "--hook-point",
        choices=HOOK_POINTS,
        help="the slot's hook point (default: as the SAE's files say, else resid_post)",
    )
    parser.add_argument("--head", type=int, help="attn_z of one attention head, as in the slot")
    parser.add_argument("--format", default="auto", help="SAE format (default: detect)")
    parser.add_argument("--selection", default="default", choices=SELECTIONS, help="as in the plugin's slot")
    parser.add_argument("--k", type=int, help="as in the plugin's slot")
    parser.add_argument("--max-codes", type=int, default=64, help="the plugin's max_codes_per_token")
    parser.add_argument(
        "--text",
        type=Path,
        action="append",
        default=[],
        help=".txt (documents separated by blank lines) or .jsonl ({'text': ...} per line); repeat",
    )
    parser.add_argument("--max-documents", type=int, default=500)
    parser.add_argument("--tokens-per-document", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="baseline file (default: next to the SAE)")
    parser.add_argument(
        "--ignore-sae-metadata",
        action="store_true",
        help="calibrate at --layer although the SAE's files name another tap (as a slot with check_sae_metadata: "
        "false)",
    )


def documents_from(paths: list[Path]) -> tuple[list[str], str]:
    """(documents, where they came from)."""
    if not paths:
        from circuitwatch.calibration import BUILT_IN_SAMPLE, built_in_documents

        return built_in_documents(), BUILT_IN_SAMPLE
    documents: list[str] = []
    for path in paths:
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--text {path}: cannot read ({exc})") from None
        if path.suffix == ".jsonl":
            for number, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UsageError(f"--text {path}:{number}: expected a JSON object with a 'text' string") from None
                if not isinstance(text, str):
                    raise UsageError(f"--text {path}:{number}: 'text' must be a string")
                documents.append(text)
        else:
            documents.extend(part.strip() for part in raw.split("\n\n") if part.strip())
    return documents, ", ".join(str(p) for p in paths)


def run_calibrate(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [name for name in ("torch", "safetensors", "transformers") if importlib.util.find_spec(name) is None]
    if missing:  # the base install is the sidecar's; calibration runs the model
        raise UsageError(
            f"needs {', '.join(missing)}, which the sidecar-only install leaves out: "
            "pip install 'circuitwatch[cpu]' (or '[gpu]') where the model runs"
        )
    from circuitwatch.kernels import SaeFormatError

    try:
        return _calibrate(args)
    except SaeFormatError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:  # a model directory that cannot be read
        raise UsageError(f"--model {args.model}: {exc}") from None


def _calibrate(args: argparse.Namespace) -> int:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from circuitwatch.calibration import calibrate
    from circuitwatch.kernels import load_sae
    from circuitwatch.kernels.baseline import default_path
    from circuitwatch.kernels.encoders import make_encoder
    from circuitwatch.kernels.hook_points import ModelShape, TapMismatchError, resolve_tap
    from circuitwatch.kernels.selection import selection_for

    documents, source = documents_from(args.text)
    documents = [d for d in documents if d.strip()][: args.max_documents]
    if not documents:
        raise UsageError("no calibration text: every --text file is empty")
    transformers.utils.logging.disable_progress_bar()  # errors and results stay one line each
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    layers = model.config.num_hidden_layers
    if not 0 <= args.layer < layers:
        raise UsageError(f"--layer {args.layer}: the model has layers 0..{layers - 1}")
    sae = load_sae(args.sae, args.format)
    try:
        tap = resolve_tap(sae.spec, args.layer, args.hook_point, args.head, check=not args.ignore_sae_metadata)
    except TapMismatchError as exc:
        raise UsageError(f"--layer/--hook-point/--head: {exc}; pass --ignore-sae-metadata if this is meant") from None
    except ValueError as exc:
        raise UsageError(f"--head {args.head}: {exc}") from None
    misfit = ModelShape.from_hf_config(model.config).misfit(tap, sae.spec.d_in)
    if misfit is not None:
        field, reason = misfit
        raise UsageError(f"--sae {args.sae}: {reason}" if field == "sae" else f"--head {reason}")
    encoder = make_encoder(sae, selection_for(args.selection, args.k, sae, args.max_codes), "torch", args.device)
    if sae.decoder is None:
        raise UsageError(f"--sae {args.sae}: no usable decoder (a transcoder?): fidelity cannot be measured")
    baseline = calibrate(
        model,
        tokenizer,
        sae,
        encoder,
        tap,
        documents,
        args.tokens_per_document,
        model_name=str(args.model),
        text=source,
    )
    out = args.out or default_path(sae)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = out.with_suffix(".tmp")
        temporary.write_text(baseline.to_json())
        temporary.replace(out)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write ({exc.strerror})") from None
    e, n = baseline.error, baseline.norm
    print(
        f"{sae.name} at {tap.label()}: {baseline.tokens} tokens of {len(documents)} documents; reconstruction "
        f"error p50 {e.p50:.3f} p90 {e.p90:.3f} p99 {e.p99:.3f}; input norm p50 {n.p50:.3g}; L0 {baseline.l0_mean:.1f}"
    )
    print(f"baseline written to {out}", file=sys.stderr)
    return 0
