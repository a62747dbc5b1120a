"""``python -m application.expand_vocab --config FILE``: add the coord vocabulary to a checkpoint (D7, data.md §4.3).

Reads ``model.path`` (a local Hugging Face Qwen3-VL checkpoint WITHOUT coord tokens) and writes the
expanded checkpoint to ``run_dir = run.output_dir / run.name``; that directory is then used as
``model.path`` by training and inference. Config keys read: ``run.name``, ``run.output_dir``,
``model.path``, ``model.dtype`` (the dtype the weights are loaded and saved in).

What the output holds: weights with the input embedding and output head grown to ``len(tokenizer)``
rows (new rows = the mean of the old tokens' rows, per table; tying kept), the tokenizer with
``<|coord_*|>`` and ``<|coord_0|>``..``<|coord_999|>`` as additional special tokens, the processor,
chat template and generation config, ``coord_tokens.json`` (token -> id for the 1001 strings) and
``resolved_config.json`` (``kind: expand_vocab``, with an ``expansion`` summary).

Rules:
- config errors (no ``model.path``, ``model.tiny`` given, missing input directory, ``run_dir`` already
  present or equal to the input) are raised before anything is loaded or written;
- a checkpoint whose tokenizer already holds the coord vocabulary is refused with a message saying
  it can be used as ``model.path`` as is (an error, not a silent no-op: the configured ``run_dir``
  would otherwise stay empty); a partially expanded tokenizer is refused as well;
- the checkpoint is written into a hidden staging directory next to ``run_dir`` and renamed into place
  only when complete and verified, so ``run_dir`` never holds a partial checkpoint;
- ``run_metadata.json`` is not written: its schema knows training and inference runs only
  (infer-eval-config.md §6); the expansion's provenance is its ``resolved_config.json``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import attrs

from application.cli import run_entry_point
from application.config import LoadedConfig, check_local_paths, load_config, write_resolved_config
from domain.errors import ConfigError
from ports.storage import ArtifactStore
from ports.vocabulary import ExpansionSummary, VocabularyExpander

ENTRY_POINT = "application.expand_vocab"
RESOLVED_KIND = "expand_vocab"


@attrs.frozen(eq=False)
class ExpandVocabDependencies:
    """The ports of one expansion (real ones: :func:`default_dependencies`; tests pass fakes)."""

    expander: VocabularyExpander
    store: ArtifactStore


def default_dependencies() -> ExpandVocabDependencies:
    """The configured adapters, from the composition root (called by :func:`main` only)."""
    from application import wiring

    return ExpandVocabDependencies(expander=wiring.make_vocabulary_expander(), store=wiring.make_artifact_store())


@attrs.frozen
class ExpandVocabOutcome:
    run_dir: Path
    summary: ExpansionSummary


def planned_paths(loaded: LoadedConfig) -> tuple[Path, Path]:
    """``(model.path, run_dir)`` after the checks that need no model: raises :class:`ConfigError`."""
    config = loaded.config
    if config.model is None or config.model.path is None:
        raise ConfigError(
            "'model.path' is required by application.expand_vocab: the checkpoint to expand "
            "('model.tiny' already carries the coord tokens and cannot be expanded)"
        )
    if config.model.tiny is not None:
        raise ConfigError(
            "'model.tiny' cannot be expanded: set only 'model.path' for application.expand_vocab"
        )
    check_local_paths(config, entry_point="expand_vocab")
    source = Path(config.model.path)
    if config.run is None:
        raise ConfigError("'run.name' and 'run.output_dir' are required by application.expand_vocab")
    run_dir = config.run.run_dir
    check_new_checkpoint_dir(source, run_dir, "the expanded checkpoint")
    return source, run_dir


def check_new_checkpoint_dir(source: Path, run_dir: Path, what: str) -> None:
    """A checkpoint derived from ``model.path`` goes to a new ``run_dir``, never onto or inside its input
    (also used by application.merge_adapter); raises :class:`ConfigError`."""
    if run_dir.resolve() == source.resolve():
        raise ConfigError(
            f"'run.output_dir' / 'run.name' = {run_dir} is the input 'model.path'; {what} "
            "must go to a new directory"
        )
    if run_dir.exists():
        raise ConfigError(
            f"run directory {run_dir} already exists; {what} is never overwritten: "
            "choose a new 'run.name' or remove that directory"
        )
    if source.resolve() in run_dir.resolve().parents:
        raise ConfigError(
            f"run directory {run_dir} lies inside the input 'model.path' {source}; choose another"
        )


def expand_vocab(loaded: LoadedConfig, deps: ExpandVocabDependencies) -> ExpandVocabOutcome:
    """Run the use case with the expander and artifact store of ``deps``."""
    source, run_dir = planned_paths(loaded)
    model = loaded.config.model
    assert model is not None  # planned_paths checked it
    expander, store = deps.expander, deps.store
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    # not mkdtemp: the expanded model gets the umask's mode, not 0700 (issue 11 item 14)
    staging = store.make_staging_directory(run_dir.parent, prefix=f".{run_dir.name}.", suffix=".partial")
    try:
        summary = expander(source, staging, dtype=model.dtype)
        write_resolved_config(
            loaded,
            staging,
            kind=RESOLVED_KIND,
            extra={"run_dir": str(run_dir), "expansion": summary.to_json()},
            store=store,
        )
        if run_dir.exists():
            raise ConfigError(f"run directory {run_dir} appeared while expanding; the result was discarded")
        os.rename(staging, run_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return ExpandVocabOutcome(run_dir=run_dir, summary=summary)


def summary_text(outcome: ExpandVocabOutcome) -> str:
    s = outcome.summary
    return "\n".join(
        [
            f"Expanded checkpoint written to {outcome.run_dir}",
            (
                f"tokens: {s.tokens_before} -> {s.tokens_after}; embedding/head rows: {s.rows_after}; "
                f"tied: {str(s.tied).lower()}"
            ),
            f"<|coord_*|> = {s.wildcard_id}; <|coord_0|> = {s.coord_ids[0]} .. <|coord_999|> = {s.coord_ids[-1]}",
            f"Use it with:  model: {{path: {outcome.run_dir}}}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    def body(config_path: Path) -> int:
        loaded = load_config(config_path, entry_point="expand_vocab")
        planned_paths(loaded)  # config errors before the adapters (and their frameworks) are imported
        outcome = expand_vocab(loaded, default_dependencies())
        print(summary_text(outcome))
        return 0

    return run_entry_point(argv, ENTRY_POINT, body)


if __name__ == "__main__":
    raise SystemExit(main())
