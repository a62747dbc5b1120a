"""HF generation backend on the embedded tiny Qwen3-VL (infer-eval-config.md §2.6-§2.7; spec tests 16, 31).

The tiny model is random, so its text is junk; these tests check the mechanics: left padding, slicing at
the padded length, cutting, seeding, and raw log-probs of the emitted ids.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from adapters.hf.checkpoint import load_model_and_processor
from adapters.hf.generation import (
    HFGenerationBackend,
    _left_padded,
    cut_generation,
    end_of_turn_ids,
    generate_kwargs,
    resolve_device,
)
from domain.errors import SetupError
from domain.prompts import build_prompt
from ports.generation import DecodingSettings, GenerationRequest

PROMPT = build_prompt("default", "tokens", "sorted", "desc_first")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    out = []
    for i, (w, h, color) in enumerate([(64, 64, "red"), (96, 64, "blue"), (64, 128, "green")]):
        path = folder / f"img_{i}.png"
        Image.new("RGB", (w, h), color).save(path)
        out.append(path)
    return out


@pytest.fixture(scope="module")
def backend(tiny_loaded: Any) -> HFGenerationBackend:
    return HFGenerationBackend(tiny_loaded, "cpu")


def requests(images: list[Path], seed: int = 17, users: tuple[str, ...] = ()) -> list[GenerationRequest]:
    out = []
    for i, path in enumerate(images):
        with Image.open(path) as im:
            w, h = im.size
        user = users[i] if i < len(users) else PROMPT.user
        out.append(GenerationRequest(i, PROMPT.system, user, str(path), seed + i, w, h, "val.jsonl", i + 1))
    return out


def full_forward_logprobs(
    backend: HFGenerationBackend, request: GenerationRequest, ids: tuple[int, ...]
) -> list[float]:
    """Independent path: the model's own forward (with its output head) on one unpadded sequence."""
    import torch

    inputs = _left_padded([backend._prompt(request)], backend.pad_id, "cpu")
    new = torch.tensor([list(ids)], dtype=torch.long)
    width = inputs["input_ids"].shape[1]
    model = backend._checkpoint.model  # type: ignore[union-attr]
    with torch.inference_mode():
        logits = model(
            input_ids=torch.cat([inputs["input_ids"], new], 1),
            attention_mask=torch.ones((1, width + len(ids)), dtype=torch.long),
            mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(new)], 1),
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
        ).logits
    logprobs = torch.log_softmax(logits[0, width - 1 : width - 1 + len(ids)].float(), -1)
    return [logprobs[j, t].item() for j, t in enumerate(ids)]


GREEDY = DecodingSettings(max_new_tokens=12, temperature=0.0, top_p=0.95, repetition_penalty=1.0)


def test_16_left_padded_rows_equal_single_runs(backend: HFGenerationBackend, images: list[Path]) -> None:
    users = ("Detect.", PROMPT.user + " Take your time and be thorough about every object.", PROMPT.user)
    reqs = requests(images, users=users)
    lengths = [backend._prompt(r).length for r in reqs]
    assert len(set(lengths)) == 3  # the batch really is padded
    batched = backend.generate(reqs, GREEDY)
    singles = [backend.generate([r], GREEDY)[0] for r in reqs]
    assert [g.index for g in batched] == [0, 1, 2]
    for b, s in zip(batched, singles):
        assert b.token_ids == s.token_ids
        assert b.text == s.text
        assert b.token_logprobs == pytest.approx(s.token_logprobs, abs=1e-4)
        assert len(b.token_ids) == len(b.token_logprobs) > 0
        # No prompt tail leaks into the generation: it never contains the assistant header or image pads.
        assert "<|im_start|>" not in b.text and "<|image_pad|>" not in b.text


def test_logprobs_are_raw_under_every_decoding_setting(
    backend: HFGenerationBackend, images: list[Path]
) -> None:
    reqs = requests(images[:2])
    for decoding in (
        GREEDY,
        DecodingSettings(max_new_tokens=10, temperature=1.7, top_p=0.5, repetition_penalty=1.3),
    ):
        for gen, request in zip(backend.generate(reqs, decoding), reqs):
            expected = full_forward_logprobs(backend, request, gen.token_ids)
            assert list(gen.token_logprobs) == pytest.approx(expected, abs=1e-4)
            assert all(v <= 0 for v in gen.token_logprobs)


def test_greedy_emits_the_argmax_of_the_raw_distribution(
    backend: HFGenerationBackend, images: list[Path]
) -> None:
    import torch

    request = requests(images[:1])[0]
    gen = backend.generate([request], GREEDY)[0]
    inputs = _left_padded([backend._prompt(request)], backend.pad_id, "cpu")
    width = inputs["input_ids"].shape[1]
    new = torch.tensor([list(gen.token_ids)])
    model = backend._checkpoint.model  # type: ignore[union-attr]
    with torch.inference_mode():
        logits = model(
            input_ids=torch.cat([inputs["input_ids"], new], 1),
            attention_mask=torch.ones((1, width + new.shape[1]), dtype=torch.long),
            mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(new)], 1),
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
        ).logits
    assert logits[0, width - 1 : width - 1 + new.shape[1]].argmax(-1).tolist() == list(gen.token_ids)
    assert max(gen.token_logprobs) <= 0 and math.isfinite(sum(gen.token_logprobs))


def test_sampling_is_reproducible_per_seed_and_leaves_the_callers_rng_alone(
    backend: HFGenerationBackend, images: list[Path]
) -> None:
    import torch

    sampling = DecodingSettings(max_new_tokens=16, temperature=1.5, top_p=1.0, repetition_penalty=1.0)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = backend.generate(requests(images, seed=5), sampling)
    assert torch.equal(torch.rand(3), expected_next)  # forked RNG scope
    again = backend.generate(requests(images, seed=5), sampling)
    other = backend.generate(requests(images, seed=6), sampling)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.token_ids for g in first] != [g.token_ids for g in other]


def test_text_keeps_special_tokens(backend: HFGenerationBackend, tiny_loaded: Any) -> None:
    tok = tiny_loaded.tokenizer
    ids = [tok.coord_ids.ids[12], tok.coord_ids.ids[40], tok.im_end_id]
    assert tok.decode(ids) == "<|coord_12|><|coord_40|><|im_end|>"
    assert backend.stop_ids >= {tok.im_end_id}


def test_end_of_turn_ids_include_generation_config_eos(tiny_loaded: Any) -> None:
    eos = tiny_loaded.model.generation_config.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos)
    assert end_of_turn_ids(tiny_loaded) == frozenset(eos_ids | {tiny_loaded.tokenizer.im_end_id})


@pytest.mark.parametrize(
    ("ids", "kept", "finish"),
    [
        ([5, 6, 2, 0, 0], [5, 6, 2], "stop"),  # cut after the first end-of-turn id, pads gone
        ([5, 2, 7, 2], [5, 2], "stop"),
        ([5, 6, 7], [5, 6, 7], "length"),
        ([5, 6, 9, 9], [5, 6], "length"),  # trailing pad ids removed (pad 9 is no stop id here)
        ([9, 5, 9, 6], [9, 5, 9, 6], "length"),  # inner pad ids are generated tokens, kept
        ([], [], "length"),
    ],
)
def test_cut_generation(ids: list[int], kept: list[int], finish: str) -> None:
    assert cut_generation(ids, {2}, pad_id=9) == (kept, finish)


def test_generate_kwargs_greedy_and_sampling() -> None:
    greedy = generate_kwargs(GREEDY, pad_id=0, stop_ids={2, 0})
    assert greedy == {
        "max_new_tokens": 12, "do_sample": False, "repetition_penalty": 1.0, "use_cache": True,
        "pad_token_id": 0, "eos_token_id": [0, 2],
    }  # fmt: skip
    sampled = generate_kwargs(DecodingSettings(max_new_tokens=3, temperature=0.7, top_p=0.9), 0, {2})
    assert (sampled["do_sample"], sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (
        True,
        0.7,
        0.9,
        0,
    )
    assert "generator" not in sampled


def test_device_resolution() -> None:
    import torch

    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
        with pytest.raises(SetupError, match="CUDA is not available"):
            resolve_device("cuda:0")


# --- attention selection (spec test 31) --------------------------------------------------------------------


def test_31_auto_falls_back_from_flash_attention_and_records_both(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from transformers import AutoModelForImageTextToText

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a),
    )
    real_load = AutoModelForImageTextToText.from_pretrained
    tried: list[str] = []

    def fake_load(*args: Any, **kwargs: Any) -> Any:
        tried.append(kwargs["attn_implementation"])
        if kwargs["attn_implementation"] == "flash_attention_2":
            raise ImportError("flash_attn is broken (fake)")
        model = real_load(*args, **kwargs)
        model.to = lambda *_a, **_k: model  # the test machine has no CUDA device to move to
        return model

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", fake_load)
    loaded = load_model_and_processor(
        tiny_checkpoint, dtype="float32", attn_implementation="auto", device="cuda:0"
    )
    assert tried == ["flash_attention_2", "sdpa"]
    facts = HFGenerationBackend(loaded, "cuda:0").describe()
    assert facts["attn_implementation_requested"] == "auto"
    assert facts["attn_implementation_selected"] == "sdpa"


def test_31_explicit_flash_attention_failure_is_fatal(tiny_checkpoint: Path) -> None:
    with pytest.raises(SetupError, match="flash_attention_2"):
        load_model_and_processor(tiny_checkpoint, dtype="float32", attn_implementation="flash_attention_2")
