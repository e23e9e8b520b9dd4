"""`circuitwatch calibrate` on the fixture model: the baseline it writes equals an independent measurement (the
transformers residual stream, the SAE format's numpy encoder and full decoder), it is pinned to its SAE, tap and
model, and every mistake a user can make is one line naming the option or file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from circuitwatch.cli import main as cli_main
from circuitwatch.fixtures import FixturePaths
from circuitwatch.fixtures.activations import residual_stream
from circuitwatch.kernels import SaeFormatError, load_sae
from circuitwatch.kernels.baseline import load_baseline, model_fingerprint
from circuitwatch.kernels.hook_points import Tap

from support import numpy_sae

DOCUMENTS = ["The try statement specifies exception handlers.\n\nA second document follows.", "Third one here."]


def calibrate(fixtures: FixturePaths, *extra: str, sae: Path | None = None, layer: int = 1) -> int:
    sae = sae or fixtures.topk_sae(1)
    return cli_main(["calibrate", "--model", str(fixtures.model), "--sae", str(sae), "--layer", str(layer), *extra])


def test_the_baseline_equals_an_independent_measurement(fixtures: FixturePaths, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = tmp_path / "calibration.txt"
    text.write_text(DOCUMENTS[0])
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(json.dumps({"text": DOCUMENTS[1]}) + "\n\n")
    out = tmp_path / "baseline.json"
    assert calibrate(fixtures, "--text", str(text), "--text", str(jsonl), "--out", str(out)) == 0

    # independently: each document alone through transformers, TopK in numpy, the full decoder from the file
    tokenizer = AutoTokenizer.from_pretrained(fixtures.model)
    model = AutoModelForCausalLM.from_pretrained(fixtures.model, dtype=torch.float32).eval()
    directory = fixtures.topk_sae(1)
    errors, norms, fired = [], [], []
    for document in ["The try statement specifies exception handlers.", "A second document follows.", DOCUMENTS[1]]:
        x = residual_stream(model, torch.tensor([tokenizer(document)["input_ids"]]), [1])[1][0].double().numpy()
        activations, _ = numpy_sae.saelens_activations(directory, x)
        errors.append(numpy_sae.reconstruction_errors(directory, x, activations))
        norms.append(np.linalg.norm(x, axis=1))
        fired.append(activations > 0)
    errors, norms, fired = np.concatenate(errors), np.concatenate(norms), np.concatenate(fired)

    sae = load_sae(directory)
    baseline = load_baseline(out, sae, Tap(1), model_fingerprint(model.config.to_dict()))
    assert baseline.tokens == len(errors) and baseline.documents == 3
    assert baseline.text == f"{text}, {jsonl}"
    assert np.isclose(baseline.error.p50, np.median(errors), rtol=1e-3)
    assert np.isclose(baseline.error_threshold, np.quantile(errors, 0.9), rtol=1e-3)
    assert np.isclose(baseline.norm.mean, norms.mean(), rtol=1e-4)
    assert np.isclose(baseline.l0_mean, fired.sum(axis=1).mean())
    np.testing.assert_allclose(baseline.frequencies, fired.mean(axis=0), atol=1e-3)
    with pytest.raises(SaeFormatError, match=r"layer.*2"):
        load_baseline(out, sae, Tap(2))


def test_the_default_sample_writes_next_to_the_sae(fixtures: FixturePaths, tmp_path: Path) -> None:
    """Without --out the baseline lands next to the SAE, where the plugin looks for it."""
    import shutil

    copy = tmp_path / "layer_1"
    shutil.copytree(fixtures.topk_sae(1), copy)
    assert calibrate(fixtures, "--max-documents", "3", "--tokens-per-document", "16", sae=copy) == 0
    data = json.loads((copy / "circuitwatch-baseline.json").read_text())
    assert data["documents"] == 3 and data["tokens"] == 48 and "CPython help topics" in data["text"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ("--layer-from-test", "2"),
            r"--layer/--hook-point/--head: SAE .* was trained on L1.resid_post .*, but the slot taps L2.resid_post",
        ),
        (("--layer-from-test", "9"), "--layer 9: the model has layers 0..3"),
        (("--text", "missing.txt"), "--text .*missing.txt: cannot read"),
        (("--text", "bad.jsonl"), r"--text .*bad.jsonl:2: expected a JSON object with a 'text' string"),
        (("--text", "empty.txt"), "no calibration text"),
        (("--out", "blocker/baseline.json"), "--out .*blocker/baseline.json: cannot write"),
    ],
    ids=["sae-of-another-layer", "no-such-layer", "missing-text", "bad-jsonl", "empty-text", "unwritable-out"],
)
def test_mistakes_are_one_line_naming_the_option(
    fixtures: FixturePaths, tmp_path: Path, monkeypatch, capsys, arguments: tuple[str, str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("bad.jsonl").write_text('{"text": "fine"}\n["not", "an", "object"]\n')
    Path("empty.txt").write_text("\n\n")
    Path("blocker").write_text("a file where a directory is needed")
    option, value = arguments
    layer = int(value) if option == "--layer-from-test" else 1
    extra = () if option == "--layer-from-test" else (option, str(tmp_path / value))
    assert calibrate(fixtures, *extra, "--max-documents", "2", layer=layer) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("circuitwatch calibrate: "), err
    assert re.search(message, err), err


def test_ignore_sae_metadata_calibrates_where_told(fixtures: FixturePaths, tmp_path: Path) -> None:
    out = tmp_path / "baseline.json"
    assert calibrate(fixtures, "--ignore-sae-metadata", "--max-documents", "2", "--out", str(out), layer=2) == 0
    assert json.loads(out.read_text())["layer"] == 2
