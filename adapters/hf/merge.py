"""Merge a LoRA / DoRA adapter checkpoint into full weights with peft (infer-eval-config.md §7.3).

:class:`PeftAdapterMerger` implements :class:`ports.adapter_merge.AdapterMerger`:

1. the base checkpoint is loaded by the project's one loader (``load_model_and_processor``: coord
   vocabulary checked against the model); the adapter checkpoint's own processor is loaded and must
   resolve the coord tokens to the same ids, and its ``coord_tokens.json`` must agree;
2. with trained coord offsets (``coord_offset_adapter`` in ``modules_to_save``) the offset module is
   installed before peft loads the adapter, in the stored layout (``head_offset`` stored = untied), its
   hooks re-attached to peft's active copy and the stored offsets checked against the tokenizer
   (``adapters.hf.coord_offsets``);
3. ``PeftModel.from_pretrained`` + ``merge_and_unload`` bake LoRA / DoRA into the base linear weights,
   then ``merge_coord_offsets`` bakes the offsets into the embedding and head (tying kept, stage1.md §7.1);
4. a fixed text probe (coord tokens included) is run through the adapter model before the merge and
   through the merged model after it; in float32 a logit difference above ``1e-4 * max(1, max|logit|)``
   is a :class:`SetupError`, and so is any adapter tensor or offset hook left in the merged model (nothing
   is saved then); the measured difference is reported for every dtype;
5. weights (safetensors), config, generation config, the adapter checkpoint's processor (tokenizer,
   chat template, image processor) and ``coord_tokens.json`` are written, then the saved processor is
   reloaded and ``coord_tokens.json`` checked against it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from adapters.hf.checkpoint import load_model_and_processor, load_processor
from adapters.hf.coord_offsets import (
    attach_coord_offset_hooks,
    coord_offset_hook_count,
    install_coord_offsets,
    merge_coord_offsets,
    restore_coord_offsets,
    stored_coord_offsets,
)
from adapters.hf.tokenizer import HFTokenizer
from adapters.hf.vocab import COORD_TOKENS_FILE, check_coord_tokens_file, shares_storage
from adapters.storage.atomic import give_umask_modes
from domain.coord_tokens import bin_to_token
from domain.errors import ArtifactError, SetupError
from ports.adapter_merge import AdapterCheckpoint, MergeReport, MergeRequest

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
COORD_OFFSET_MODULE = "coord_offset_adapter"
# Relative to max(1, max |logit|): float32 must reproduce the adapter model; half precisions are reported only.
PROBE_TOLERANCE = {"float32": 1e-4}
_PROBE_BINS = (0, 1, 250, 500, 998, 999)


class PeftAdapterMerger:
    """The Hugging Face / peft merger (``application.wiring.make_adapter_merger``)."""

    def read_adapter(self, directory: Path) -> AdapterCheckpoint:
        from peft import PeftConfig

        directory = Path(directory)
        file = directory / ADAPTER_CONFIG
        if not file.is_file():
            raise ArtifactError(f"{directory}: no {ADAPTER_CONFIG} (not a LoRA/DoRA adapter checkpoint)")
        try:
            json.loads(file.read_text(encoding="utf-8"))
            auto: Any = PeftConfig
            config = auto.from_pretrained(str(directory))
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
            raise ArtifactError(f"{file}: cannot read the adapter config: {exc}") from exc
        peft_type = str(getattr(config.peft_type, "value", config.peft_type))
        if peft_type != "LORA":
            raise ArtifactError(
                f"{file}: 'peft_type' is {peft_type!r}; only LORA adapters (LoRA or DoRA) can be merged"
            )
        base = config.base_model_name_or_path
        if not isinstance(base, str) or not base:
            raise ArtifactError(f"{file}: 'base_model_name_or_path' is not set; the base checkpoint is unknown")
        if not any((directory / name).is_file() for name in ADAPTER_WEIGHTS):
            raise ArtifactError(f"{directory}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
        targets = config.target_modules
        target_modules = (targets,) if isinstance(targets, str) else tuple(sorted(targets or ()))
        return AdapterCheckpoint(
            path=directory,
            base_model=base,
            peft_type=peft_type,
            use_dora=bool(config.use_dora),
            target_modules=target_modules,
            coord_offsets=COORD_OFFSET_MODULE in (config.modules_to_save or ()),
        )

    def merge(self, request: MergeRequest) -> MergeReport:
        import torch
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        adapter_dir, out = request.adapter.path, request.output_dir
        base = load_model_and_processor(request.base_dir, dtype=request.dtype, device="cpu")
        processor = load_processor(adapter_dir, full_checkpoint=False)
        table = HFTokenizer(processor.tokenizer).coord_ids
        if table.ids != base.coord_ids.ids:
            raise ArtifactError(
                f"{adapter_dir}: its tokenizer gives the coord tokens other ids than the base checkpoint "
                f"{request.base_dir}; the adapter was not trained on this base"
            )
        check_coord_tokens_file(adapter_dir, processor.tokenizer)

        model = base.model
        tie_head: bool | None = None
        if request.adapter.coord_offsets:
            stored = stored_coord_offsets(adapter_dir)
            if "embed_offset" not in stored:
                raise ArtifactError(
                    f"{adapter_dir / ADAPTER_CONFIG}: 'modules_to_save' lists {COORD_OFFSET_MODULE} but the "
                    "adapter weights store no coord offsets"
                )
            tie_head = "head_offset" not in stored
            dtype_name = str(stored["embed_offset"].dtype).removeprefix("torch.")
            install_coord_offsets(model, table, tie_head=tie_head, dtype=dtype_name)
        adapted: Any = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        if request.adapter.coord_offsets:
            attach_coord_offset_hooks(adapted)
            restore_coord_offsets(adapted, adapter_dir)
        adapted.eval()
        merged_modules = sum(isinstance(m, LoraLayer) for m in adapted.modules())
        if merged_modules == 0:
            raise ArtifactError(f"{adapter_dir}: peft wrapped no module of the base; nothing to merge")

        probe = torch.tensor([_probe_ids(processor.tokenizer)], dtype=torch.long)
        with torch.no_grad():
            before = adapted(input_ids=probe).logits.float()
            merged: Any = adapted.merge_and_unload()
            if request.adapter.coord_offsets:
                merge_coord_offsets(merged)
            after = merged(input_ids=probe).logits.float()
        leftovers = [k for k in merged.state_dict() if COORD_OFFSET_MODULE in k or "lora_" in k]
        if leftovers or coord_offset_hook_count(merged):
            raise SetupError(
                f"{adapter_dir}: after the merge the model still holds adapter parts {leftovers[:3]} or "
                f"{coord_offset_hook_count(merged)} coord-offset hooks; nothing was written"
            )
        difference = float((after - before).abs().max())
        tolerance = PROBE_TOLERANCE.get(request.dtype)
        if tolerance is not None and difference > tolerance * max(1.0, float(before.abs().max())):
            raise SetupError(
                f"{adapter_dir}: the merged model's logits differ from the adapter model's by {difference:.3g} "
                f"on the probe (tolerance {tolerance:g} relative); nothing was written"
            )

        merged.save_pretrained(str(out))
        processor.save_pretrained(str(out))
        shutil.copy2(adapter_dir / COORD_TOKENS_FILE, out / COORD_TOKENS_FILE)
        give_umask_modes(out)  # safetensors writes 0600: a team on a shared machine must read the merge
        _verify_output(out)
        embedding, head = merged.get_input_embeddings(), merged.get_output_embeddings()
        return MergeReport(
            adapter_dir=adapter_dir,
            base_dir=request.base_dir,
            dtype=request.dtype,
            peft_type=request.adapter.peft_type,
            use_dora=request.adapter.use_dora,
            merged_modules=int(merged_modules),
            coord_offsets=request.adapter.coord_offsets,
            tie_head=tie_head,
            tied=shares_storage(embedding.weight, head.weight),
            probe_max_abs_diff=difference,
            files=tuple(sorted(p.name for p in out.iterdir() if p.is_file())),
        )


def _probe_ids(tokenizer: Any) -> list[int]:
    """A short CoordJSON line: ordinary text pieces and coord tokens at both ends of the bin range."""
    coords = ", ".join(bin_to_token(k) for k in _PROBE_BINS)
    text = '{"objects": [{"desc": "cat", "bbox_2d": [' + coords + "]}]}"
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


def _verify_output(out: Path) -> None:
    if not (out / "config.json").is_file():
        raise SetupError(f"{out}: the merged checkpoint has no config.json")
    if not any(out.glob("*.safetensors")):
        raise SetupError(f"{out}: the merged checkpoint has no safetensors weights")
    saved = load_processor(out)
    check_coord_tokens_file(out, saved.tokenizer)
