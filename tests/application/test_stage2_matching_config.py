"""The domain's matching settings and the config schema's ``matching`` block share their defaults (stage2.md §20)."""

from __future__ import annotations

import attrs

from application.config.schema import MatchingConfig
from domain.stage2_matching import MatchSettings

FIELDS = ("maskiou_gate", "candidate_top_k", "maskiou_resolution", "fp_cost", "fn_cost")


def test_defaults_agree() -> None:
    config, settings = MatchingConfig(), MatchSettings()
    assert {f: getattr(config, f) for f in FIELDS} == {f: getattr(settings, f) for f in FIELDS}


def test_every_matching_key_that_section_6_reads_is_a_settings_field() -> None:
    assert set(FIELDS) == {a.name for a in attrs.fields(MatchSettings)}
    assert set(FIELDS) <= {a.name for a in attrs.fields(MatchingConfig)}
