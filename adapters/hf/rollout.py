"""HF ``generate`` on the live training module as a :class:`ports.rollout.RolloutBackend` (stage2.md §2, §16.1).

- The module is the one being trained (never a reloaded checkpoint), so weight sync is a no-op that records the
  policy version.
- Micro-batches of ``batch_size`` consecutive requests with equal decoding settings: generate-mode encode
  (:class:`adapters.hf.encoding.HFSampleEncoder`), left-padded collate (``adapters.hf.generation``), prompt ids =
  the request's own (non-pad) ids.
- The module is unwrapped (``DistributedDataParallel.module``), put in eval mode for ``generate`` and its previous
  mode restored after, also on an exception; no gradient.
- Decoding mapping of §2.2 (:func:`rollout_generate_kwargs`); sampling runs inside :func:`seeded_rng`: Python,
  NumPy, torch and CUDA RNG states saved, all seeded with the micro-batch's first seed, restored after, so training
  randomness is unaffected (§2.3). With ``batch_size = 1`` every request gets its own seed.
- Beam: ``num_return_sequences = num_beams``, best beam = argmax ``sequences_scores``; sampling with ``n > 1``:
  ``num_return_sequences = n``. Response = ids after the padded prompt, cut after the first stop id, trailing stop
  and pad ids removed; pieces decoded one id at a time with special tokens kept (D11).
- Repeat-terminate guard (§16.6, ``rollout.repeat_terminate``): :class:`RepeatTerminateProcessor`, a
  transformers ``LogitsProcessor``, forces ``<|im_end|>`` on a sequence once
  ``domain.repeat_terminate.repeat_terminate_reason`` holds for it. The sample's
  ``repeat_terminate_triggered`` is that same rule asked of the finished sequence just before its first
  stop id: the processor forced that stop iff the rule held there (it is a function of the prefix), which
  stays true for beams, whose rows the processor cannot follow.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from transformers import LogitsProcessor, LogitsProcessorList

from adapters.hf.generation import _left_padded, cut_generation
from domain.errors import InvariantViolation, SetupError
from domain.prompts import PromptTexts
from domain.repeat_terminate import RepeatTerminateSettings, records_started, repeat_terminate_reason
from ports.rollout import (
    RolloutDecoding,
    RolloutRequest,
    RolloutResult,
    RolloutSample,
    SyncKind,
    WeightSyncReport,
    WeightSyncRequest,
)
from ports.tokenizer import ChatSample, EncodedPrompt, SampleEncoderPort, SampleOrigin, TokenizerPort

MIN_SAMPLING_TEMPERATURE = 1e-4


def rollout_generate_kwargs(
    decoding: RolloutDecoding, pad_id: int, stop_ids: Collection[int]
) -> dict[str, Any]:
    """§2.2's HF mapping: greedy -> ``do_sample=False, temperature=1.0, top_p=1.0, top_k=0``."""
    sampling = decoding.sampling
    beam = decoding.decode_mode == "beam"
    return {
        "do_sample": sampling,
        "temperature": max(MIN_SAMPLING_TEMPERATURE, decoding.temperature) if sampling else 1.0,
        "top_p": float(decoding.top_p) if sampling else 1.0,
        "top_k": int(decoding.top_k) if sampling and decoding.top_k != -1 else 0,
        "repetition_penalty": float(decoding.repetition_penalty),
        "max_new_tokens": int(decoding.max_new_tokens),
        "num_beams": int(decoding.num_beams),
        "num_return_sequences": int(decoding.num_beams) if beam else int(decoding.n),
        "return_dict_in_generate": True,
        "output_scores": beam,
        "use_cache": True,
        "pad_token_id": int(pad_id),
        "eos_token_id": sorted(int(i) for i in stop_ids),
    }


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed Python, NumPy, torch and every CUDA device with ``seed``; restore all four states after."""
    import torch

    python_state = random.getstate()
    numpy_state = np.random.get_state()
    cuda = torch.cuda.is_available()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        try:
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)  # also seeds every CUDA device
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextmanager
def eval_mode(module: Any) -> Iterator[Any]:
    """``module.eval()`` for the block, then the previous train/eval mode back (also on an exception)."""
    was_training = bool(module.training)
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def unwrap_module(module: Any) -> Any:
    """The module to call ``generate`` on: DDP's ``.module`` when wrapped, else the module itself."""
    inner = getattr(module, "module", None)
    return inner if inner is not None and hasattr(inner, "generate") else module


def strip_response(ids: Sequence[int], stop_ids: Collection[int], pad_id: int) -> tuple[tuple[int, ...], str]:
    """Cut after the first stop id, drop trailing stop / pad ids; finish ``stop`` iff a stop id ended it."""
    kept, finish = cut_generation(ids, stop_ids, pad_id)
    while kept and (kept[-1] in stop_ids or kept[-1] == pad_id):
        kept.pop()
    return tuple(kept), finish


def _piece_memo(piece: Callable[[int], str]) -> Callable[[int], str]:
    memo: dict[int, str] = {}

    def cached(token_id: int) -> str:
        text = memo.get(token_id)
        if text is None:
            text = memo[token_id] = piece(token_id)
        return text

    return cached


class RepeatTerminateProcessor(LogitsProcessor):
    """§16.6 as a transformers ``LogitsProcessor``: a row whose generation (ids after the padded prompt
    width) meets ``repeat_terminate_reason`` gets every logit ``-inf`` but ``end_id``'s (0), so its next
    token is the end of turn under greedy, sampling and beam search alike. Rows that already hold a stop
    id are finished and left alone. ``fired`` counts the rows it forced (beams included).
    ``piece`` decodes one id (needed only with ``max_objects``, to count ``"desc": `` in the text)."""

    def __init__(
        self,
        settings: RepeatTerminateSettings,
        *,
        prompt_width: int,
        end_id: int,
        stop_ids: Collection[int],
        piece: Callable[[int], str] | None = None,
    ) -> None:
        if settings.max_objects is not None and piece is None:
            raise SetupError(
                "rollout.repeat_terminate.max_objects needs the tokenizer to decode the generation"
            )
        self.settings = settings
        self.prompt_width = int(prompt_width)
        self.end_id = int(end_id)
        self.stop_ids = sorted({int(i) for i in stop_ids} | {self.end_id})
        self.piece = _piece_memo(piece) if piece is not None else None
        self.fired = 0
        self._texts: dict[int, tuple[list[int], str]] = {}  # row -> (generated ids, their text)

    def _records(self, row: int, ids: list[int]) -> int:
        assert self.piece is not None
        known, text = self._texts.get(row, ([], ""))
        if known != ids[: len(known)]:  # beam search reordered the rows: decode this one afresh
            known, text = [], ""
        text += "".join(self.piece(t) for t in ids[len(known) :])
        self._texts[row] = (ids, text)
        return records_started(text)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        generated = input_ids[:, self.prompt_width :]
        gen_len = int(generated.shape[1])
        if gen_len < self.settings.min_new_tokens:
            return scores
        stops = torch.tensor(self.stop_ids, device=generated.device, dtype=generated.dtype)
        finished = torch.isin(generated, stops).any(dim=1).tolist()
        window = min(self.settings.window, gen_len)
        tails = generated[:, gen_len - window :].tolist()
        forced: list[int] = []
        for row, tail in enumerate(tails):
            if finished[row]:
                continue
            n_records = 0
            if self.settings.max_objects is not None:
                n_records = self._records(row, generated[row].tolist())
            if repeat_terminate_reason(tail, self.settings, gen_len=gen_len, n_records=n_records) is not None:
                forced.append(row)
        if not forced:
            return scores
        self.fired += len(forced)
        out = scores.clone()
        rows = torch.tensor(forced, device=scores.device)
        out[rows] = float("-inf")
        out[rows, self.end_id] = 0.0
        return out


class HFRolloutBackend:
    """:class:`ports.rollout.RolloutBackend` on the live module (runs on CPU)."""

    name = "hf"

    def __init__(
        self,
        module: Any,
        encoder: SampleEncoderPort,
        *,
        stop_ids: Collection[int],
        device: str = "cpu",
        batch_size: int = 1,
        initial_version: int = 0,
        repeat_terminate: RepeatTerminateSettings | None = None,
    ) -> None:
        if batch_size < 1:
            raise SetupError(f"rollout.hf_batch_size must be >= 1, got {batch_size}")
        self._module: Any = module
        self._encoder = encoder
        self._tokenizer: TokenizerPort = encoder.tokenizer
        self._stop_ids = frozenset(int(i) for i in stop_ids)
        self._pad_id = self._tokenizer.pad_id
        self._device = device
        self._batch_size = batch_size
        self._version = int(initial_version)
        self._repeat_terminate = repeat_terminate
        self._piece = _piece_memo(self._tokenizer.piece)

    @property
    def policy_version(self) -> int:
        return self._version

    def supports_sync(self, kind: SyncKind) -> bool:
        return kind in ("full", "adapter")

    def sync_weights(self, update: WeightSyncRequest) -> WeightSyncReport:
        """The live module already holds the trained weights: record the version, move nothing."""
        if self._module is None:
            raise SetupError("the HF rollout backend was closed")
        skipped = update.version == self._version
        self._version = int(update.version)
        return WeightSyncReport(version=self._version, kind=update.kind, skipped=skipped)

    def _prompt(self, request: RolloutRequest) -> EncodedPrompt:
        if len(request.images) != 1:
            raise SetupError(
                f"{request.where}: the HF rollout backend takes exactly one image, got {len(request.images)}"
            )
        if request.width <= 0 or request.height <= 0:
            raise SetupError(f"{request.where}: the HF rollout backend needs the record's width and height")
        sample = ChatSample(
            prompt=PromptTexts(system=request.system, user=request.user),
            image_path=request.images[0],
            width=request.width,
            height=request.height,
            target=None,
            origin=SampleOrigin(source=request.source, line=request.line, record_index=request.index),
        )
        return self._encoder.encode_prompt(sample)

    def _micro_batches(self, requests: Sequence[RolloutRequest]) -> Iterator[list[RolloutRequest]]:
        batch: list[RolloutRequest] = []
        for request in requests:
            if batch and (len(batch) == self._batch_size or request.decoding != batch[0].decoding):
                yield batch
                batch = []
            batch.append(request)
        if batch:
            yield batch

    def generate(self, requests: Sequence[RolloutRequest]) -> list[RolloutResult]:
        if self._module is None:
            raise SetupError("the HF rollout backend was closed")
        results: list[RolloutResult] = []
        for batch in self._micro_batches(requests):
            results.extend(self._generate_batch(batch))
        if [r.index for r in results] != [r.index for r in requests]:
            raise InvariantViolation("HF rollout: results are not in request order")
        return results

    def _generate_batch(self, batch: Sequence[RolloutRequest]) -> list[RolloutResult]:
        import torch

        decoding = batch[0].decoding
        prompts = [self._prompt(r) for r in batch]
        model = unwrap_module(self._module)
        inputs = _left_padded(prompts, self._pad_id, self._device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype=model.dtype)
        kwargs = rollout_generate_kwargs(decoding, self._pad_id, self._stop_ids)
        if self._repeat_terminate is not None:
            guard = RepeatTerminateProcessor(
                self._repeat_terminate,
                prompt_width=int(inputs["input_ids"].shape[1]),
                end_id=self._tokenizer.im_end_id,
                stop_ids=self._stop_ids,
                piece=self._piece,
            )
            kwargs["logits_processor"] = LogitsProcessorList([guard])
        seed = batch[0].seed if decoding.sampling else None
        with eval_mode(model), torch.no_grad():
            if seed is not None:
                with seeded_rng(seed):
                    out = model.generate(**inputs, **kwargs)
            else:
                out = model.generate(**inputs, **kwargs)
        width = inputs["input_ids"].shape[1]
        rows: list[list[int]] = out.sequences[:, width:].cpu().tolist()
        per_prompt = kwargs["num_return_sequences"]
        if len(rows) != len(batch) * per_prompt:
            raise InvariantViolation(
                f"generate returned {len(rows)} rows for {len(batch)} prompts x {per_prompt}"
            )
        if decoding.decode_mode == "beam":
            scores = out.sequences_scores.reshape(len(batch), per_prompt).cpu()
            best = scores.argmax(dim=1).tolist()
            chosen = [[rows[b * per_prompt + int(best[b])]] for b in range(len(batch))]
        else:
            chosen = [rows[b * per_prompt : (b + 1) * per_prompt] for b in range(len(batch))]
        return [
            RolloutResult(
                index=request.index,
                prompt_ids=tuple(int(i) for i in np.asarray(prompt.input_ids)),
                samples=tuple(self._sample(row) for row in sample_rows),
                policy_version=self._version,
                decode_mode=decoding.decode_mode,
                seed=seed,
            )
            for request, prompt, sample_rows in zip(batch, prompts, chosen)
        ]

    def _sample(self, row: Sequence[int]) -> RolloutSample:
        ids, finish = strip_response(row, self._stop_ids, self._pad_id)
        return RolloutSample(
            response_ids=ids,
            pieces=tuple(self._piece(i) for i in ids),
            finish_reason="stop" if finish == "stop" else "length",
            repeat_terminate_triggered=self._triggered(row),
        )

    def _triggered(self, row: Sequence[int]) -> bool:
        """Whether the guard forced this sequence's end: the §16.6 rule holds just before its first stop id."""
        settings = self._repeat_terminate
        if settings is None:
            return False
        stop = next((t for t, i in enumerate(row) if i in self._stop_ids), None)
        if stop is None:
            return False
        generated = list(row[:stop])
        n_records = 0
        if settings.max_objects is not None:
            n_records = records_started("".join(self._piece(i) for i in generated))
        return repeat_terminate_reason(generated, settings, n_records=n_records) is not None

    def close(self) -> None:
        self._module = None

    def describe(self) -> Mapping[str, object]:
        return {
            "backend": "hf",
            "device": self._device,
            "hf_batch_size": self._batch_size,
            "live_module": True,
            "repeat_terminate": self._repeat_terminate is not None,
        }
