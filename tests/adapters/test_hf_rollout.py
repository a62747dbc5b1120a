"""HF rollout backend on the live tiny Qwen3-VL module (stage2.md §2.2-§2.4, §16.1; spec test 62).

The tiny model is random, so its text is junk: these tests check the mechanics (decoding mapping, RNG scope,
eval mode restored, order, stop handling, n samples, best beam, version bookkeeping).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.hf.encoding import HFSampleEncoder
from adapters.hf.generation import end_of_turn_ids
from adapters.hf.rollout import (
    HFRolloutBackend,
    RepeatTerminateProcessor,
    eval_mode,
    rollout_generate_kwargs,
    seeded_rng,
    strip_response,
)
from domain.errors import SetupError
from domain.prompts import build_prompt
from domain.repeat_terminate import RepeatTerminateSettings, repeat_terminate_reason
from domain.rollout_plan import request_seed, seed_base
from ports.rollout import RolloutDecoding, RolloutRequest, WeightSyncRequest

PROMPT = build_prompt("default", "tokens", "sorted", "desc_first")
GREEDY = RolloutDecoding(max_new_tokens=6)
SAMPLED = RolloutDecoding(max_new_tokens=6, temperature=1.0)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("rollout_images")
    out = []
    for i, (w, h, color) in enumerate([(64, 64, "red"), (96, 64, "blue"), (64, 32, "green")]):
        path = folder / f"img_{i}.png"
        Image.new("RGB", (w, h), color).save(path)
        out.append(path)
    return out


@pytest.fixture(scope="module")
def backend(tiny_loaded: Any) -> HFRolloutBackend:
    encoder = HFSampleEncoder(tiny_loaded.processor, tiny_loaded.tokenizer)
    return HFRolloutBackend(tiny_loaded.model, encoder, stop_ids=end_of_turn_ids(tiny_loaded), device="cpu")


def make_requests(
    images: Sequence[Path], decoding: RolloutDecoding, base: int = 3000051
) -> list[RolloutRequest]:
    out = []
    for i, path in enumerate(images):
        with Image.open(path) as im:
            w, h = im.size
        out.append(
            RolloutRequest(
                i,
                PROMPT.system,
                PROMPT.user,
                (str(path),),
                decoding,
                request_seed(base, i),
                w,
                h,
                "t.jsonl",
                i + 1,
            )
        )
    return out


# ---- decoding mapping (§2.2; spec test 62) -----------------------------------------------------------------


def test_greedy_mapping() -> None:
    kwargs = rollout_generate_kwargs(
        RolloutDecoding(max_new_tokens=9, top_p=0.5, top_k=7), pad_id=0, stop_ids={5, 2}
    )
    assert (kwargs["do_sample"], kwargs["temperature"], kwargs["top_p"], kwargs["top_k"]) == (
        False,
        1.0,
        1.0,
        0,
    )
    assert kwargs["max_new_tokens"] == 9 and kwargs["return_dict_in_generate"] is True
    assert kwargs["eos_token_id"] == [2, 5] and kwargs["num_return_sequences"] == 1


def test_sampling_mapping() -> None:
    kwargs = rollout_generate_kwargs(RolloutDecoding(max_new_tokens=4, temperature=0.7, top_p=0.9), 0, {2})
    assert (kwargs["do_sample"], kwargs["temperature"], kwargs["top_p"], kwargs["top_k"]) == (
        True,
        0.7,
        0.9,
        0,
    )
    assert rollout_generate_kwargs(RolloutDecoding(max_new_tokens=4, temperature=1e-6, top_k=5), 0, {2})[
        "temperature"
    ] == pytest.approx(1e-4)
    assert (
        rollout_generate_kwargs(RolloutDecoding(max_new_tokens=4, temperature=0.5, top_k=5), 0, {2})["top_k"]
        == 5
    )
    beam = rollout_generate_kwargs(RolloutDecoding(max_new_tokens=4, decode_mode="beam", num_beams=3), 0, {2})
    assert (beam["num_beams"], beam["num_return_sequences"], beam["output_scores"]) == (3, 3, True)
    assert (
        rollout_generate_kwargs(RolloutDecoding(max_new_tokens=4, temperature=1.0, n=4), 0, {2})[
            "num_return_sequences"
        ]
        == 4
    )


def test_decoding_rejects_bad_values() -> None:
    for bad in ({"temperature": -0.1}, {"top_p": 0.0}, {"top_k": 0}, {"repetition_penalty": 0.0}, {"num_beams": 2},
                {"decode_mode": "beam", "num_beams": 2, "n": 2}, {"n": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            RolloutDecoding(max_new_tokens=4, **bad)


def test_seeded_rng_restores_python_numpy_torch() -> None:
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with seeded_rng(1234):
        inside = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    with seeded_rng(1234):
        assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == inside


def test_strip_response() -> None:
    assert strip_response([7, 8, 2, 9, 0], {2}, 0) == ((7, 8), "stop")
    assert strip_response([7, 8, 0, 0], {2}, 0) == ((7, 8), "length")
    assert strip_response([7, 2, 2], {2, 3}, 0) == ((7,), "stop")


class _Exploding(torch.nn.Module):
    def generate(self, **_: Any) -> Any:
        assert not self.training
        raise RuntimeError("boom")


def test_eval_mode_restored_after_exception() -> None:
    module = _Exploding().train()
    with pytest.raises(RuntimeError, match="boom"), eval_mode(module):
        module.generate()
    assert module.training
    module.eval()
    with eval_mode(module):
        pass
    assert not module.training


# ---- on the tiny model ---------------------------------------------------------------------------------------


def test_greedy_rollout_order_pieces_and_mode(
    backend: HFRolloutBackend, tiny_loaded: Any, images: list[Path]
) -> None:
    model = tiny_loaded.model
    model.train()
    try:
        batch = make_requests(images, GREEDY)
        results = backend.generate(batch)
        assert model.training, "previous (train) mode must be restored after generate"
    finally:
        model.eval()
    assert [r.index for r in results] == [0, 1, 2]
    singles = [backend.generate([r])[0] for r in reversed(batch)][::-1]
    tok = tiny_loaded.tokenizer
    for result, single, request in zip(results, singles, batch):
        assert result.response_ids == single.response_ids  # order kept, no cross-request mix-up
        assert result.seed is None and result.policy_version == 0 and result.decode_mode == "greedy"
        sample = result.samples[0]
        assert "".join(sample.pieces) == tok.decode(sample.response_ids)
        assert not set(sample.response_ids) & set(end_of_turn_ids(tiny_loaded))
        assert 0 < len(sample.response_ids) <= 6 or sample.finish_reason == "stop"
        assert len(result.prompt_ids) > 0 and result.prompt_ids[-1] != tok.pad_id
    assert backend.generate([]) == []


def test_sampling_seeded_per_request_and_training_rng_untouched(
    backend: HFRolloutBackend, images: list[Path]
) -> None:
    torch.manual_seed(99)
    untouched = torch.rand(3)
    torch.manual_seed(99)
    first = backend.generate(make_requests(images[:2], SAMPLED, base=seed_base(42, 3)))
    assert torch.equal(torch.rand(3), untouched), "rollout sampling must not advance the training RNG"
    again = backend.generate(make_requests(images[:2], SAMPLED, base=seed_base(42, 3)))
    other = backend.generate(make_requests(images[:2], SAMPLED, base=seed_base(42, 4)))
    assert [r.response_ids for r in first] == [r.response_ids for r in again]
    assert [r.seed for r in first] == [3000051, 3000052]
    assert [r.response_ids for r in first] != [r.response_ids for r in other]


def test_n_samples_per_prompt(backend: HFRolloutBackend, images: list[Path]) -> None:
    [result] = backend.generate(
        make_requests(images[:1], RolloutDecoding(max_new_tokens=5, temperature=1.0, n=3))
    )
    assert len(result.samples) == 3
    assert len({s.response_ids for s in result.samples}) > 1


def test_beam_returns_best_beam(backend: HFRolloutBackend, tiny_loaded: Any, images: list[Path]) -> None:
    decoding = RolloutDecoding(max_new_tokens=4, decode_mode="beam", num_beams=3)
    [result] = backend.generate(make_requests(images[:1], decoding))
    assert len(result.samples) == 1
    request = make_requests(images[:1], decoding)[0]
    from adapters.hf.generation import _left_padded

    prompt = backend._prompt(request)
    inputs = _left_padded([prompt], tiny_loaded.tokenizer.pad_id, "cpu")
    kwargs = rollout_generate_kwargs(decoding, tiny_loaded.tokenizer.pad_id, end_of_turn_ids(tiny_loaded))
    with torch.no_grad():
        out = tiny_loaded.model.generate(**inputs, **kwargs)
    best = int(out.sequences_scores.argmax())
    expected = strip_response(out.sequences[best, inputs["input_ids"].shape[1] :].tolist(),
                              end_of_turn_ids(tiny_loaded), tiny_loaded.tokenizer.pad_id)[0]  # fmt: skip
    assert result.response_ids == expected


def test_sync_records_version_and_close(tiny_loaded: Any, images: list[Path]) -> None:
    encoder = HFSampleEncoder(tiny_loaded.processor, tiny_loaded.tokenizer)
    own = HFRolloutBackend(tiny_loaded.model, encoder, stop_ids=end_of_turn_ids(tiny_loaded))
    assert own.supports_sync("full") and own.supports_sync("adapter")
    report = own.sync_weights(WeightSyncRequest(version=5, kind="full"))
    assert (report.version, report.skipped, own.policy_version) == (5, False, 5)
    assert own.sync_weights(WeightSyncRequest(version=5, kind="adapter")).skipped
    assert own.generate(make_requests(images[:1], GREEDY))[0].policy_version == 5
    own.close()
    with pytest.raises(SetupError, match="closed"):
        own.generate(make_requests(images[:1], GREEDY))


def test_request_without_image_size_is_a_located_error(backend: HFRolloutBackend, images: list[Path]) -> None:
    bad = RolloutRequest(4, "s", "u", (str(images[0]),), GREEDY, 1, 0, 0, "train.jsonl", 12)
    with pytest.raises(SetupError, match=r"request 4 \(train.jsonl:12\)"):
        backend.generate([bad])


# ---- repeat-terminate guard (§16.6) -----------------------------------------------------------------------


STOP, END = 50, 51


def forced_rows(scores: torch.Tensor) -> list[int]:
    """Rows whose only finite logit is END's."""
    finite = torch.isfinite(scores)
    return [r for r in range(scores.shape[0]) if finite[r].sum() == 1 and bool(finite[r, END])]


def test_processor_forces_exactly_the_rows_the_rule_names() -> None:
    rng = random.Random(3)
    rule = RepeatTerminateSettings(
        min_new_tokens=4, max_consecutive_token_repeats=3, ngram_size=2, ngram_repeats=2
    )
    width = 5
    for _ in range(200):
        gen_len = rng.randint(0, 12)
        rows = [[rng.randint(0, 2) for _ in range(width + gen_len)] for _ in range(4)]
        if gen_len and rng.random() < 0.3:
            rows[0][width + rng.randrange(gen_len)] = STOP  # a finished row is left alone
        proc = RepeatTerminateProcessor(rule, prompt_width=width, end_id=END, stop_ids={STOP})
        scores = torch.zeros(4, 60)
        out = proc(torch.tensor(rows), scores)
        expected = [
            r for r, row in enumerate(rows)
            if STOP not in row[width:] and repeat_terminate_reason(row[width:], rule) is not None
        ]  # fmt: skip
        assert forced_rows(out) == expected and proc.fired == len(expected)
        assert torch.equal(scores, torch.zeros(4, 60)), "the input scores are not modified in place"
        if not expected:
            assert out is scores


def test_processor_counts_records_across_steps_and_reordered_beams() -> None:
    pieces = {1: '{"de', 2: 'sc": ', 3: '"a", ', 4: "x", 5: '"desc": '}
    rule = RepeatTerminateSettings(
        min_new_tokens=0, max_consecutive_token_repeats=99, ngram_size=50, ngram_repeats=2, max_objects=2
    )
    proc = RepeatTerminateProcessor(
        rule, prompt_width=1, end_id=END, stop_ids={STOP}, piece=pieces.__getitem__
    )
    a, b = [0, 1, 2, 3, 4], [0, 4, 4, 4, 4]
    assert forced_rows(proc(torch.tensor([a, b]), torch.zeros(2, 60))) == []  # one record started in row 0
    # Beam search swaps the rows; row 1 (a's continuation) now starts its second record.
    assert forced_rows(proc(torch.tensor([b + [4], a + [5]]), torch.zeros(2, 60))) == [1]
    assert forced_rows(proc(torch.tensor([a + [5, 4], b + [4, 4]]), torch.zeros(2, 60))) == [0]
    with pytest.raises(SetupError, match="max_objects"):
        RepeatTerminateProcessor(rule, prompt_width=1, end_id=END, stop_ids={STOP})


def guarded(tiny_loaded: Any, rule: RepeatTerminateSettings, batch_size: int = 1) -> HFRolloutBackend:
    encoder = HFSampleEncoder(tiny_loaded.processor, tiny_loaded.tokenizer)
    return HFRolloutBackend(
        tiny_loaded.model, encoder, stop_ids=end_of_turn_ids(tiny_loaded), batch_size=batch_size,
        repeat_terminate=rule,
    )  # fmt: skip


@pytest.mark.parametrize(
    "rule",
    [
        RepeatTerminateSettings(min_new_tokens=3, max_consecutive_token_repeats=1),  # fires at 3 tokens
        RepeatTerminateSettings(min_new_tokens=7, max_consecutive_token_repeats=1),  # fires at 7 tokens
        # The random tiny model repeats nothing in 12 tokens: these leave the rollout as it is.
        RepeatTerminateSettings(
            min_new_tokens=0, max_consecutive_token_repeats=2, ngram_size=2, ngram_repeats=2
        ),
        RepeatTerminateSettings(min_new_tokens=99),  # never before max_new_tokens
    ],
)
def test_guard_on_the_tiny_model_cuts_the_free_rollout_where_the_rule_first_holds(
    tiny_loaded: Any, images: list[Path], rule: RepeatTerminateSettings
) -> None:
    """Greedy, three prompts in one left-padded batch: each guarded response is the unguarded one cut
    at the first length where §16.6 holds, ended by <|im_end|>, and flagged; otherwise unchanged."""
    decoding = RolloutDecoding(max_new_tokens=12)
    free = guarded(tiny_loaded, None, batch_size=3).generate(make_requests(images, decoding))  # type: ignore[arg-type]
    cut = guarded(tiny_loaded, rule, batch_size=3).generate(make_requests(images, decoding))
    for plain, result in zip(free, cut):
        ids = list(plain.response_ids)
        first = next(
            (t for t in range(len(ids) + 1) if repeat_terminate_reason(ids[:t], rule) is not None), None
        )
        sample = result.samples[0]
        if first is None or (first == len(ids) and plain.samples[0].finish_reason == "length"):
            assert sample.response_ids == plain.response_ids and not sample.repeat_terminate_triggered
        else:
            assert sample.response_ids == tuple(ids[:first])
            assert sample.finish_reason == "stop" and sample.repeat_terminate_triggered
    assert not any(r.samples[0].repeat_terminate_triggered for r in free)


def test_guard_with_beam_search_and_sampling(tiny_loaded: Any, images: list[Path]) -> None:
    rule = RepeatTerminateSettings(min_new_tokens=2, max_consecutive_token_repeats=1)
    backend = guarded(tiny_loaded, rule)
    for decoding in (
        RolloutDecoding(max_new_tokens=6, decode_mode="beam", num_beams=3),
        RolloutDecoding(max_new_tokens=6, temperature=1.0, n=2),
    ):
        [result] = backend.generate(make_requests(images[:1], decoding))
        for sample in result.samples:
            assert len(sample.response_ids) == 2 and sample.finish_reason == "stop"
            assert sample.repeat_terminate_triggered
    assert backend.describe()["repeat_terminate"] is True


def test_memoised_pieces_equal_per_id_decode(tiny_loaded: Any) -> None:
    tok = tiny_loaded.tokenizer
    ids = list(range(tok.vocab_size))
    for _ in range(2):  # cold, then from the memo
        assert [tok.piece(i) for i in ids] == [tok.decode([i]) for i in ids]
