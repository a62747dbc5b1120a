"""HF ``generate`` behind :class:`ports.generation.GenerationBackend` (infer-eval-config.md §2.6-§2.7, D11).

One padded ``generate`` call per micro-batch:

- prompts encoded in generate mode by :class:`adapters.hf.encoding.HFSampleEncoder` (the one message
  builder, images as stored), left-padded with the tokenizer's pad id;
- torch seeded with the batch's seed (``run.seed + first index``) inside a forked RNG scope, cuDNN
  deterministic, TF32 off; no generation RNG state carries across batches;
- kwargs: ``max_new_tokens``, ``do_sample = temperature > 0`` and only when sampling ``temperature``,
  ``top_p`` and ``top_k`` (0 = off, so the checkpoint's generation-config ``top_k`` never applies
  silently), ``repetition_penalty``, ``use_cache=True``, pad and end-of-turn ids;
- generated ids start at the **padded** input length; each row is cut after its first end-of-turn id
  (``<|im_end|>`` or a generation-config EOS id), trailing pad ids removed;
- log-probs of the emitted ids under the unprocessed distribution come from one teacher-forced pass
  over prompt + generation (prompt with its image, then the generated ids continuing its KV cache, as
  ``generate`` conditioned): the decoder's hidden states, then the output head over position chunks
  with a log-softmax and a gather, so full-vocabulary logits never exist for more than one chunk;
- decoding keeps special tokens and does no clean-up (coord tokens and ``<|im_end|>`` survive).
"""

from __future__ import annotations

import gc
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from adapters.hf.checkpoint import LoadedCheckpoint
from adapters.hf.encoding import HFSampleEncoder
from domain.errors import InvariantViolation, SetupError
from domain.prompts import PromptTexts
from ports.generation import DecodingSettings, Generation, GenerationRequest
from ports.model import GeneratedSequence
from ports.tokenizer import ChatSample, EncodedPrompt, SampleOrigin

LOGPROB_CHUNK = 256  # positions per output-head chunk in the teacher-forced pass


def resolve_device(device: str) -> str:
    """``infer.device``: ``auto`` is ``cuda:0`` when CUDA is available, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SetupError(f"infer.device is {device!r} but CUDA is not available; use 'cpu' or 'auto'")
    return device


def end_of_turn_ids(checkpoint: LoadedCheckpoint) -> frozenset[int]:
    """``<|im_end|>`` plus every EOS id of the checkpoint's generation config."""
    ids = {checkpoint.tokenizer.im_end_id}
    config = getattr(checkpoint.model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(i) for i in eos)
    return frozenset(ids)


def set_deterministic() -> None:
    """cuDNN deterministic, no benchmark autotuning, TF32 off (§2.7)."""
    import torch

    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _left_padded(prompts: Sequence[EncodedPrompt], pad_id: int, device: Any) -> dict[str, Any]:
    import torch

    width = max(p.length for p in prompts)
    batch = len(prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    mm_types = torch.zeros((batch, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        start = width - prompt.length
        input_ids[row, start:] = torch.from_numpy(np.asarray(prompt.input_ids, dtype=np.int64))
        attention_mask[row, start:] = 1
        mm_types[row, start:] = torch.from_numpy(np.asarray(prompt.mm_token_type_ids, dtype=np.int64))
    pixel_values = torch.cat([torch.from_numpy(np.asarray(p.pixel_values)) for p in prompts], dim=0)
    grid = torch.cat([torch.from_numpy(np.asarray(p.image_grid_thw, dtype=np.int64)) for p in prompts], dim=0)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "mm_token_type_ids": mm_types.to(device),
        "pixel_values": pixel_values.to(device),
        "image_grid_thw": grid.to(device),
    }


def generate_kwargs(decoding: DecodingSettings, pad_id: int, stop_ids: Collection[int]) -> dict[str, Any]:
    """The ``generate`` keyword arguments of §2.6 (never a kwarg remote model code may reject)."""
    sampling = decoding.temperature > 0
    kwargs: dict[str, Any] = {
        "max_new_tokens": int(decoding.max_new_tokens),
        "do_sample": sampling,
        "repetition_penalty": float(decoding.repetition_penalty),
        "use_cache": True,
        "pad_token_id": int(pad_id),
        "eos_token_id": sorted(int(i) for i in stop_ids),
    }
    if decoding.num_beams != 1:
        raise SetupError("the HF generation backend decodes with num_beams = 1 only")
    if sampling:
        kwargs["temperature"] = float(decoding.temperature)
        kwargs["top_p"] = float(decoding.top_p)
        kwargs["top_k"] = int(decoding.top_k) if decoding.top_k > 0 else 0
    return kwargs


def cut_generation(ids: Sequence[int], stop_ids: Collection[int], pad_id: int) -> tuple[list[int], str]:
    """Cut after the first end-of-turn id (``stop``), else drop trailing pad ids (``length``)."""
    out = [int(i) for i in ids]
    for position, token_id in enumerate(out):
        if token_id in stop_ids:
            return out[: position + 1], "stop"
    while out and out[-1] == pad_id:
        out.pop()
    return out, "length"


def teacher_forced_logprobs(
    model: Any, inputs: Mapping[str, Any], generated: Any, kept: Sequence[int], chunk: int = LOGPROB_CHUNK
) -> list[list[float]]:
    """Log-probabilities of ``generated[b, :kept[b]]`` under the model's raw distribution.

    Teacher forcing the way ``generate`` conditioned: one decoder pass over the padded prompt with its
    image (KV cache kept), one pass over the generated ids as a text continuation of that cache (an
    emitted image placeholder id is then an ordinary input token, as it was while generating). The
    output head runs over chunks of positions with a float32 ``log_softmax`` and a gather.
    """
    import torch

    longest = max(kept, default=0)
    if longest == 0:
        return [[] for _ in kept]
    new = generated[:, :longest]
    batch = new.shape[0]
    decoder = model.model
    with torch.inference_mode():
        prompt_pass = decoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            use_cache=True,
        )
        hidden = [prompt_pass[0][:, -1:, :]]  # the last prompt position predicts generated token 0
        if longest > 1:
            steps = longest - 1
            ones = torch.ones((batch, steps), dtype=inputs["attention_mask"].dtype, device=new.device)
            mask = torch.cat([inputs["attention_mask"], ones], dim=1)
            # Decode-step positions as generate builds them: mask-based text positions plus the prompt's
            # M-RoPE delta, the same on the three rotary sections.
            text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -steps:]
            deltas = prompt_pass.rope_deltas.to(text.device).reshape(batch, -1)[:, :1]
            positions = (text + deltas).unsqueeze(0).expand(3, -1, -1)
            continuation = decoder(
                input_ids=new[:, :steps],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=prompt_pass.past_key_values,
                use_cache=True,
            )
            hidden.append(continuation[0])
        states = torch.cat(hidden, dim=1)  # [B, longest, H]: position j predicts generated token j
        del prompt_pass
        head = model.get_output_embeddings()
        picked = torch.empty((batch, longest), dtype=torch.float32, device=new.device)
        for start in range(0, longest, chunk):
            stop = min(start + chunk, longest)
            logprobs = torch.log_softmax(head(states[:, start:stop, :]).float(), dim=-1)
            picked[:, start:stop] = logprobs.gather(-1, new[:, start:stop].unsqueeze(-1)).squeeze(-1)
            del logprobs
    rows = picked.cpu().tolist()
    return [rows[b][: kept[b]] for b in range(batch)]


def generate_sequences(
    model: Any,
    prompts: Sequence[EncodedPrompt],
    decoding: DecodingSettings,
    *,
    seed: int,
    pad_id: int,
    stop_ids: Collection[int],
    device: Any,
) -> list[GeneratedSequence]:
    """One padded ``generate`` call for a micro-batch, seeded with ``seed`` in a forked RNG scope.

    Rows are returned in input order; generated ids start at the padded input length.
    """
    import torch

    if not prompts:
        return []
    set_deterministic()
    inputs = _left_padded(prompts, pad_id, device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype=model.dtype)
    devices = [torch.device(device).index or 0] if str(device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        with torch.inference_mode():
            sequences = model.generate(**inputs, **generate_kwargs(decoding, pad_id, stop_ids))
    width = inputs["input_ids"].shape[1]
    generated = sequences[:, width:]
    cuts = [cut_generation(row, stop_ids, pad_id) for row in generated.cpu().tolist()]
    logprobs = teacher_forced_logprobs(model, inputs, generated, [len(ids) for ids, _ in cuts])
    out = []
    for prompt, (ids, finish), row_logprobs in zip(prompts, cuts, logprobs):
        out.append(
            GeneratedSequence(
                prompt_ids=tuple(int(i) for i in np.asarray(prompt.input_ids)),
                token_ids=tuple(ids),
                token_logprobs=tuple(float(v) for v in row_logprobs),
                finish_reason=finish,
            )
        )
    return out


class HFGenerationBackend:
    """:class:`ports.generation.GenerationBackend` on a loaded HF checkpoint (runs on CPU)."""

    name = "hf"

    def __init__(self, checkpoint: LoadedCheckpoint, device: str) -> None:
        self._checkpoint: LoadedCheckpoint | None = checkpoint
        self._encoder = HFSampleEncoder(checkpoint.processor, checkpoint.tokenizer)
        self.tokenizer = checkpoint.tokenizer
        self.device = device
        self.stop_ids = end_of_turn_ids(checkpoint)
        self.pad_id = checkpoint.tokenizer.pad_id
        self._facts: dict[str, object] = {
            "device": device,
            "dtype": checkpoint.dtype,
            "attn_implementation_requested": checkpoint.attn_implementation_requested,
            "attn_implementation_selected": checkpoint.attn_implementation_selected,
        }

    def _prompt(self, request: GenerationRequest) -> EncodedPrompt:
        if request.width <= 0 or request.height <= 0:
            raise InvariantViolation(
                f"request {request.index}: the HF backend needs the record's width and height"
            )
        sample = ChatSample(
            prompt=PromptTexts(system=request.system, user=request.user),
            image_path=request.image_path,
            width=request.width,
            height=request.height,
            target=None,
            origin=SampleOrigin(source=request.source, line=request.line, record_index=request.index),
        )
        return self._encoder.encode_prompt(sample)

    def generate(self, requests: Sequence[GenerationRequest], decoding: DecodingSettings) -> list[Generation]:
        """One padded generate call; the batch seed is the first request's seed (``run.seed + i``)."""
        if self._checkpoint is None:
            raise SetupError("the HF generation backend was closed")
        if not requests:
            return []
        prompts = [self._prompt(r) for r in requests]
        sequences = generate_sequences(
            self._checkpoint.model,
            prompts,
            decoding,
            seed=requests[0].seed,
            pad_id=self.pad_id,
            stop_ids=self.stop_ids,
            device=self.device,
        )
        if len(sequences) != len(requests):
            raise InvariantViolation(f"generate returned {len(sequences)} rows for {len(requests)} prompts")
        return [
            Generation(
                index=request.index,
                token_ids=seq.token_ids,
                text=self.tokenizer.decode(seq.token_ids),
                token_logprobs=seq.token_logprobs,
                prompt_ids=seq.prompt_ids,
                finish_reason=seq.finish_reason,
                ended_with_stop=seq.finish_reason == "stop",
            )
            for request, seq in zip(requests, sequences)
        ]

    def close(self) -> None:
        if self._checkpoint is None:
            return
        self._checkpoint = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a hard dependency of this adapter
            pass

    def describe(self) -> Mapping[str, object]:
        return dict(self._facts)


def load_hf_backend(path: str, *, dtype: str, attn_implementation: str, device: str) -> HFGenerationBackend:
    """Load the checkpoint (attention auto-selection, §2.6) on ``device`` and wrap it."""
    from adapters.hf.checkpoint import load_model_and_processor

    resolved = resolve_device(device)
    checkpoint = load_model_and_processor(
        path, dtype=dtype, attn_implementation=attn_implementation, device=resolved
    )
    return HFGenerationBackend(checkpoint, resolved)
