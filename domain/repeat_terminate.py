"""The repeat-terminate guard's rule (stage2.md §16.6): when a rollout is forced to end its turn.

``rollout.repeat_terminate.{min_new_tokens, max_consecutive_token_repeats, ngram_size, ngram_repeats,
max_objects}``. A sequence is forced to EOS once ``gen_len >= min_new_tokens`` and any of:

- ``max_objects``: records started (occurrences of ``"desc": `` in the decoded generation) ``>= max_objects``;
- ``token_repeat``: the last token repeated ``>= max_consecutive_token_repeats`` times in a row;
- ``ngram_repeat``: the last ``ngram_size``-gram equals each of the ``ngram_repeats - 1`` n-grams right
  before it (consecutive, non-overlapping).

Pure: the HF logits processor (``adapters.hf.rollout``) asks it at every decoding step, and the backend
asks it again on the finished sequence to report the trigger flag. It never changes supervision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from domain.errors import ConfigError

#: What starts a record in the generated text (§16.6: "records started").
RECORD_START = '"desc": '

MAX_OBJECTS = "max_objects"
TOKEN_REPEAT = "token_repeat"
NGRAM_REPEAT = "ngram_repeat"


def _at_least(bound: int) -> Any:
    def check(_: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
        if value is None and attribute.name == "max_objects":
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < bound:
            raise ConfigError(
                f"rollout.repeat_terminate.{attribute.name}: must be an integer >= {bound}, got {value!r}"
            )

    return check


@attrs.frozen
class RepeatTerminateSettings:
    """``rollout.repeat_terminate`` without ``enabled`` (a backend gets None when the guard is off)."""

    min_new_tokens: int = attrs.field(default=256, validator=_at_least(0))
    max_consecutive_token_repeats: int = attrs.field(default=64, validator=_at_least(1))
    ngram_size: int = attrs.field(default=64, validator=_at_least(1))
    ngram_repeats: int = attrs.field(default=2, validator=_at_least(2))
    max_objects: int | None = attrs.field(default=None, validator=_at_least(1))

    @property
    def window(self) -> int:
        """How many of the last generated tokens the repeat checks read."""
        return max(self.max_consecutive_token_repeats, self.ngram_size * self.ngram_repeats)


def records_started(text: str) -> int:
    """Records started in a decoded generation: occurrences of ``"desc": ``."""
    return text.count(RECORD_START)


def repeat_terminate_reason(
    generated: Sequence[int],
    settings: RepeatTerminateSettings,
    *,
    gen_len: int | None = None,
    n_records: int = 0,
) -> str | None:
    """Why the guard ends the turn after ``generated`` (``max_objects`` / ``token_repeat`` /
    ``ngram_repeat``, in that order), or None.

    ``generated`` is the generation so far, or only its last ``settings.window`` (or more) ids with the
    full length in ``gen_len``; ``n_records`` is :func:`records_started` of the decoded generation (read
    only when ``max_objects`` is set).
    """
    length = len(generated) if gen_len is None else gen_len
    if length < settings.min_new_tokens:
        return None
    if settings.max_objects is not None and n_records >= settings.max_objects:
        return MAX_OBJECTS
    tail = list(generated[-settings.window :]) if settings.window else []
    k = settings.max_consecutive_token_repeats
    if len(tail) >= k and all(t == tail[-1] for t in tail[-k:]):
        return TOKEN_REPEAT
    n, r = settings.ngram_size, settings.ngram_repeats
    if len(tail) >= n * r:
        last = tail[-n:]
        if all(tail[len(tail) - (m + 1) * n : len(tail) - m * n] == last for m in range(1, r)):
            return NGRAM_REPEAT
    return None
