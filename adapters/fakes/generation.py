"""A scripted :class:`ports.generation.GenerationBackend` for pipeline tests (no model, no framework).

The script maps a request to what the "model" says: a text (tokenized with the fake tokenizer, cut after
the first end-of-turn id like a real backend), a :class:`SampleFailure` (the backend reports that sample
as failed), or an exception instance (the whole ``generate`` call raises it, as a transport failure of a
batched call would). Every call is recorded so tests can check batch sizes, seeds and decoding settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import attrs

from adapters.fakes.tokenizer import FakeTokenizer
from ports.generation import DecodingSettings, Generation, GenerationRequest


@attrs.frozen
class SampleFailure:
    """The backend answers this sample with ``Generation.error`` set (e.g. HTTP 500 for one request)."""

    message: str


ScriptAnswer = str | SampleFailure | BaseException
Script = Callable[[GenerationRequest], ScriptAnswer]
LogprobRule = Callable[[int, int], float]  # (position in the generation, token id) -> log-probability


def constant_logprob(value: float) -> LogprobRule:
    return lambda _position, _token_id: value


HALF = constant_logprob(math.log(0.5))  # every token has probability 0.5 unless a test says otherwise


class ScriptedGenerationBackend:
    """Answers from a script; records ``calls`` (request indices per call), ``seeds`` and ``decodings``."""

    name = "fake"

    def __init__(
        self,
        script: Script | Mapping[int, ScriptAnswer],
        *,
        tokenizer: FakeTokenizer | None = None,
        logprob: LogprobRule = HALF,
        describe: Mapping[str, object] | None = None,
    ) -> None:
        self._script: Script = (lambda r: script[r.index]) if isinstance(script, Mapping) else script
        self.tokenizer = tokenizer if tokenizer is not None else FakeTokenizer()
        self._logprob = logprob
        self._describe = dict(describe or {"device": "fake"})
        self.calls: list[list[int]] = []
        self.seeds: list[list[int]] = []
        self.decodings: list[DecodingSettings] = []
        self.closed = False

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset({self.tokenizer.im_end_id, self.tokenizer.pad_id})

    def generate(self, requests: Sequence[GenerationRequest], decoding: DecodingSettings) -> list[Generation]:
        self.calls.append([r.index for r in requests])
        self.seeds.append([r.seed for r in requests])
        self.decodings.append(decoding)
        answers = [self._script(r) for r in requests]
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        return [self._generation(r, a, decoding) for r, a in zip(requests, answers)]

    def _generation(
        self, request: GenerationRequest, answer: ScriptAnswer, decoding: DecodingSettings
    ) -> Generation:
        if isinstance(answer, SampleFailure):
            return Generation(index=request.index, error=answer.message)
        assert isinstance(answer, str)
        ids = self.tokenizer.encode(answer)
        finish = "length"
        for position, token_id in enumerate(ids):
            if token_id in self.stop_ids:
                ids, finish = ids[: position + 1], "stop"
                break
        if finish == "length":
            # no stop id: a real backend stops only at the token limit; a shorter scripted answer ended there
            finish = "length" if len(ids) >= decoding.max_new_tokens else "stop"
            ids = ids[: decoding.max_new_tokens]
        return Generation(
            index=request.index,
            token_ids=tuple(ids),
            text=self.tokenizer.decode(ids),
            token_logprobs=tuple(self._logprob(p, t) for p, t in enumerate(ids)),
            finish_reason=finish,
            ended_with_stop=finish == "stop",
        )

    def close(self) -> None:
        self.closed = True

    def describe(self) -> Mapping[str, object]:
        return dict(self._describe)
