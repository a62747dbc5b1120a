"""What a model's ``generate`` returns (stage2.md §2, infer-eval-config.md §2.6): the emitted ids and
the log-probability of every emitted token under the model's unprocessed distribution."""

from __future__ import annotations

import attrs


@attrs.frozen
class GeneratedSequence:
    """One generation, in input order.

    ``prompt_ids``: the ids the model was conditioned on (no padding). ``token_ids``: the generated
    ids, cut after the first end-of-turn id (``<|im_end|>`` or a generation-config EOS id, kept as the
    last id when present), padding removed. ``token_logprobs[i]``: log-probability of
    ``token_ids[i]`` under the unprocessed distribution (temperature 1, no top-p/top-k, no penalty).
    ``finish_reason``: ``"stop"`` when an end-of-turn id ended it, else ``"length"``.
    """

    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]
    finish_reason: str
