"""Running the training use case in tests: the entry point's dependencies with a chosen engine and encoder."""

from __future__ import annotations

import attrs

from adapters.fakes.training import FakeSampleEncoder, RecordingTrainingEngine
from application.config import LoadedConfig
from application.train import default_dependencies, train
from ports.tokenizer import SampleEncoderPort
from ports.training import TrainingEngine, TrainingOutcome


def run_train(
    loaded: LoadedConfig, engine: TrainingEngine | None = None, *, encoder: SampleEncoderPort | None = None
) -> TrainingOutcome:
    """``train`` with the configured adapters (real stores, real lengths), except ``engine`` when given.

    With a :class:`RecordingTrainingEngine` and no ``encoder`` the samples are measured by a
    :class:`FakeSampleEncoder` of 10 tokens a sample (no tokenizer is loaded); pass ``encoder`` to choose.
    """
    deps = default_dependencies(loaded.config, engine=engine)
    if encoder is None and isinstance(engine, RecordingTrainingEngine):
        encoder = FakeSampleEncoder(base_length=10, chars_per_token=None)
    if encoder is not None:
        chosen = encoder
        deps = attrs.evolve(deps, open_encoder=lambda _path: chosen)
    return train(loaded, deps)
