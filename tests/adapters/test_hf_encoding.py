"""Sample encoding with the tiny checkpoint's processor (data.md §6.2-§6.5, §11 tests 30, 31, 33, 34; stage2.md §8).

The reference for every id sequence is the processor's own ``apply_chat_template(tokenize=True)``.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.hf.checkpoint import LoadedCheckpoint
from adapters.hf.encoding import HFSampleEncoder
from domain.coordjson import render
from domain.errors import DataContractError
from domain.objects import CoordMode, DetObject, FieldOrder, GeometryKind
from domain.prompts import PromptTexts, build_prompt, chat_messages
from ports.tokenizer import IGNORE_INDEX, ChatSample, SampleEncoderPort, SampleOrigin

SHAPES = Path(__file__).resolve().parents[2] / "data" / "shapes3"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    out: dict[str, Path] = {}
    for name, (w, h) in {"rgb_640x480.png": (640, 480), "small_96x64.png": (96, 64)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
        out[name] = root / name
    gray = root / "gray_64x64.png"
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), mode="L").save(gray)
    out["gray_64x64.png"] = gray
    shutil.copy(SHAPES / "img_1.jpg", root / "img_1.jpg")  # a real 256x256 JPEG
    out["img_1.jpg"] = root / "img_1.jpg"
    return out


@pytest.fixture(scope="module")
def encoder(tiny_loaded: LoadedCheckpoint) -> HFSampleEncoder:
    return HFSampleEncoder(tiny_loaded.processor)


BOX = GeometryKind.BBOX
POLY = GeometryKind.POLY
OBJECTS = [
    DetObject("cat", BOX, (12, 40, 300, 410)),
    DetObject("yellow box", POLY, (12, 34, 56, 34, 56, 78)),
    DetObject('tool "cabinet", café', BOX, (100, 120, 180, 200)),
    DetObject("bow (weapon)", BOX, (0, 0, 999, 999)),
]


def make_sample(
    image: Path, size: tuple[int, int], objects: list[DetObject] | None, *,
    field_order: str = "desc_first", coord_mode: str = "tokens", line: int = 1,
) -> ChatSample:
    prompt = build_prompt("default", coord_mode, "sorted", field_order)
    target = None if objects is None else render(objects, FieldOrder(field_order), CoordMode(coord_mode))
    return ChatSample(
        prompt=prompt, image_path=str(image), width=size[0], height=size[1], target=target,
        origin=SampleOrigin(source="train.jsonl", line=line, record_index=line - 1),
    )


def sample_set(images: dict[str, Path]) -> list[ChatSample]:
    big, jpg, small, gray = (images[n] for n in ("rgb_640x480.png", "img_1.jpg", "small_96x64.png", "gray_64x64.png"))
    return [
        make_sample(big, (640, 480), OBJECTS),
        make_sample(jpg, (256, 256), OBJECTS[:1], field_order="geometry_first", line=2),
        make_sample(jpg, (256, 256), OBJECTS[1:], coord_mode="numeric", line=3),
        make_sample(small, (96, 64), [], line=4),
        make_sample(gray, (64, 64), OBJECTS[::-1], field_order="geometry_first", coord_mode="numeric", line=5),
    ]


def processor_reference(loaded: LoadedCheckpoint, sample: ChatSample, *, generation: bool = False) -> Any:
    """The processor's own encoding of the same conversation (the template and tokenizer as shipped)."""
    messages = chat_messages(sample.prompt, sample.image_path, None if generation else sample.target)
    return loaded.processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=generation,
        return_assistant_tokens_mask=not generation, processor_kwargs={"do_resize": False}, return_tensors="np",
    )


def test_encoder_implements_the_port(encoder: HFSampleEncoder) -> None:
    assert isinstance(encoder, SampleEncoderPort)


def test_rendered_text_is_the_qwen_layout(tiny_loaded: LoadedCheckpoint) -> None:
    """data.md §6.2: the tiny template renders exactly the Qwen3-VL turn layout."""
    texts = PromptTexts(system="SYS", user="USER")
    full = tiny_loaded.processor.apply_chat_template(chat_messages(texts, "x.png", "A"), tokenize=False)
    assert full == (
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "USER<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    )
    prompt = tiny_loaded.processor.apply_chat_template(
        chat_messages(texts, "x.png"), tokenize=False, add_generation_prompt=True
    )
    assert prompt == full[: full.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")]


def test_template_parity_for_a_set_of_samples(
    encoder: HFSampleEncoder, tiny_loaded: LoadedCheckpoint, images: dict[str, Path]
) -> None:
    """Our prompt ⊕ target ids ⊕ terminator == the processor's apply_chat_template(tokenize=True) output."""
    for sample in sample_set(images):
        encoded = encoder.encode_sample(sample)
        reference = processor_reference(tiny_loaded, sample)
        assert encoded.input_ids.tolist() == reference["input_ids"][0].tolist(), sample.origin
        assert np.array_equal(encoded.pixel_values, reference["pixel_values"])
        assert encoded.image_grid_thw.tolist() == reference["image_grid_thw"].tolist()
        assert encoded.mm_token_type_ids.tolist() == reference["mm_token_type_ids"][0].tolist()
        # the template's own {% generation %} span is exactly what our labels supervise
        assert (encoded.labels != IGNORE_INDEX).astype(int).tolist() == reference["assistant_masks"][0].tolist()


def test_generation_prompt_parity(
    encoder: HFSampleEncoder, tiny_loaded: LoadedCheckpoint, images: dict[str, Path]
) -> None:
    """stage2.md §8.1: generate-mode prompt ids == the processor's add_generation_prompt encoding."""
    for sample in sample_set(images):
        prompt = encoder.encode_prompt(sample)
        reference = processor_reference(tiny_loaded, sample, generation=True)
        assert prompt.input_ids.tolist() == reference["input_ids"][0].tolist()
        assert prompt.length == encoder.encode_sample(sample).prompt_length
        assert encoder.encode_sample(sample).input_ids[: prompt.length].tolist() == prompt.input_ids.tolist()


def test_labels_supervise_exactly_the_target_and_im_end(encoder: HFSampleEncoder, images: dict[str, Path]) -> None:
    """data.md §11 test 30 and the §6.2 span invariant."""
    tok = encoder.tokenizer
    for sample in sample_set(images):
        assert sample.target is not None
        encoded = encoder.encode_sample(sample)
        ids, labels, p = encoded.input_ids, encoded.labels, encoded.prompt_length
        assert labels.shape == ids.shape and encoded.length == len(ids)
        assert (labels[:p] == IGNORE_INDEX).all()
        assert tok.decode(ids[:p].tolist()).endswith("<|im_start|>assistant\n")
        supervised = ids[labels != IGNORE_INDEX].tolist()
        assert tok.decode(supervised) == sample.target + "<|im_end|>"
        assert supervised == tok.encode(sample.target) + [tok.im_end_id]
        assert labels[p : p + len(supervised)].tolist() == supervised  # one contiguous span right after the prompt
        assert tok.decode(ids[p + len(supervised) :].tolist()) == "\n"  # trailing newline unsupervised
        assert labels[-1] == IGNORE_INDEX


@pytest.mark.parametrize(("name", "size", "grid", "n"), [
    ("rgb_640x480.png", (640, 480), [1, 30, 40], 300),
    ("img_1.jpg", (256, 256), [1, 16, 16], 64),
    ("small_96x64.png", (96, 64), [1, 4, 6], 6),
])
def test_grid_and_placeholders_without_resize(
    encoder: HFSampleEncoder, images: dict[str, Path], name: str, size: tuple[int, int], grid: list[int], n: int
) -> None:
    """data.md §3.2 / §11 test 31: image_grid_thw == [1, H/16, W/16], N = (H/32)(W/32) placeholders."""
    encoded = encoder.encode_sample(make_sample(images[name], size, OBJECTS[:2]))
    assert encoded.image_grid_thw.tolist() == [grid]
    assert int((encoded.input_ids == encoder.image_token_id).sum()) == n
    assert encoded.pixel_values.shape[0] == grid[1] * grid[2]


def test_computed_length_equals_encoded_length(encoder: HFSampleEncoder, images: dict[str, Path]) -> None:
    """data.md §11 test 33, first half (the computed length never opens the image)."""
    samples = sample_set(images)
    lengths = encoder.checked_lengths(samples, max_length=12000)
    assert lengths == [encoder.encode_sample(s).length for s in samples]
    assert lengths == [encoder.sample_length(s) for s in samples]
    missing = make_sample(Path("/nonexistent/image.png"), (640, 480), OBJECTS)
    assert encoder.sample_length(missing) == lengths[0]


DESCS = st.text(
    alphabet=st.sampled_from(list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789()/-,:'\"éç")), min_size=1, max_size=12
).map(lambda s: " ".join(s.split())).filter(bool)
BOXES = st.tuples(st.integers(0, 998), st.integers(0, 998)).flatmap(
    lambda xy: st.tuples(st.just(xy[0]), st.just(xy[1]), st.integers(xy[0] + 1, 999), st.integers(xy[1] + 1, 999))
)
OBJECT_LISTS = st.lists(st.builds(lambda d, b: DetObject(d, BOX, b), DESCS, BOXES), min_size=2, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(objects=OBJECT_LISTS, seed=st.integers(0, 2**16), field_order=st.sampled_from(["desc_first", "geometry_first"]),
       coord_mode=st.sampled_from(["tokens", "numeric"]))
def test_length_is_invariant_under_object_order(
    encoder: HFSampleEncoder, images: dict[str, Path], objects: list[DetObject], seed: int,
    field_order: str, coord_mode: str,
) -> None:
    """data.md §6.5 / §11 test 33, second half: plans made in canonical order hold under random order."""
    shuffled = list(objects)
    random.Random(seed).shuffle(shuffled)
    a = make_sample(images["rgb_640x480.png"], (640, 480), objects, field_order=field_order, coord_mode=coord_mode)
    b = make_sample(images["rgb_640x480.png"], (640, 480), shuffled, field_order=field_order, coord_mode=coord_mode)
    assert encoder.sample_length(a) == encoder.sample_length(b)


def test_length_invariance_on_encoded_samples(encoder: HFSampleEncoder, images: dict[str, Path]) -> None:
    base = make_sample(images["img_1.jpg"], (256, 256), OBJECTS)
    for seed in range(3):
        shuffled = list(OBJECTS)
        random.Random(seed).shuffle(shuffled)
        other = make_sample(images["img_1.jpg"], (256, 256), shuffled)
        assert encoder.encode_sample(other).length == encoder.encode_sample(base).length


def test_over_length_error_lists_file_line_and_length(encoder: HFSampleEncoder, images: dict[str, Path]) -> None:
    """data.md §6.5 / §11 test 34."""
    samples = [make_sample(images["rgb_640x480.png"], (640, 480), OBJECTS, line=i + 1) for i in range(23)]
    samples.append(make_sample(images["small_96x64.png"], (96, 64), [], line=24))
    short = encoder.sample_length(samples[-1])
    long = encoder.sample_length(samples[0])
    with pytest.raises(DataContractError) as info:
        encoder.checked_lengths(samples, max_length=long - 1)
    message = str(info.value)
    assert f"train.jsonl:1 length={long}" in message and f"train.jsonl:20 length={long}" in message
    assert "train.jsonl:21 " not in message and "... and 3 more" in message
    assert f"training.max_length={long - 1}" in message and "data.max_pixels" in message
    assert "train.jsonl:24" not in message  # the short one is fine
    assert encoder.checked_lengths(samples, max_length=long)[-1] == short  # length == cap is allowed
    assert encoder.encode_sample(samples[0]).length == long  # never truncated


def test_image_problems_name_file_and_line(encoder: HFSampleEncoder, images: dict[str, Path]) -> None:
    wrong_size = make_sample(images["rgb_640x480.png"], (640, 448), OBJECTS, line=7)
    with pytest.raises(DataContractError, match=r"train.jsonl:7: images\[0\]: file is 640x480, record says 640x448"):
        encoder.encode_sample(wrong_size)
    missing = make_sample(Path("/nonexistent/x.png"), (640, 480), OBJECTS, line=8)
    with pytest.raises(DataContractError, match=r"train.jsonl:8: images\[0\]: cannot read /nonexistent/x.png"):
        encoder.encode_prompt(missing)
    not_multiple = make_sample(images["rgb_640x480.png"], (640, 470), OBJECTS, line=9)
    with pytest.raises(DataContractError, match=r"train.jsonl:9: height: .*multiple of 32"):
        encoder.sample_length(not_multiple)


def test_teacher_forced_equals_train_mode_and_modes_do_not_interfere(
    encoder: HFSampleEncoder, images: dict[str, Path]
) -> None:
    """stage2.md §2.1.5 / §8.1: the two modes are independent; prompt ⊕ Y ⊕ terminator == the training sample."""
    sample = make_sample(images["img_1.jpg"], (256, 256), OBJECTS)
    assert sample.target is not None
    first_prompt = encoder.encode_prompt(sample)
    trained = encoder.encode_sample(sample)
    second_prompt = encoder.encode_prompt(sample)
    assert first_prompt.input_ids.tolist() == second_prompt.input_ids.tolist()
    forced = encoder.teacher_forced(second_prompt, encoder.tokenizer.encode(sample.target))
    assert forced.input_ids.tolist() == trained.input_ids.tolist()
    assert forced.labels.tolist() == trained.labels.tolist()
    tok = encoder.tokenizer
    assert [tok.piece(i) for i in encoder.terminator_ids] == ["<|im_end|>", "\n"]
    assert (forced.record_index, forced.line, forced.source) == (0, 1, "train.jsonl")


def test_forward_on_an_encoded_sample(
    encoder: HFSampleEncoder, tiny_loaded: LoadedCheckpoint, images: dict[str, Path]
) -> None:
    """The encoded tensors feed the model as they are; logits cover the coord mask."""
    import torch

    encoded = encoder.encode_sample(make_sample(images["small_96x64.png"], (96, 64), OBJECTS[:1]))
    with torch.no_grad():
        out = tiny_loaded.model(
            input_ids=torch.from_numpy(encoded.input_ids)[None],
            pixel_values=torch.from_numpy(encoded.pixel_values),
            image_grid_thw=torch.from_numpy(encoded.image_grid_thw),
            mm_token_type_ids=torch.from_numpy(encoded.mm_token_type_ids)[None],
        )
    assert tuple(out.logits.shape) == (1, encoded.length, tiny_loaded.logits_vocab_size)
    assert int(tiny_loaded.coord_ids.mask(out.logits.shape[-1]).sum()) == 1000
