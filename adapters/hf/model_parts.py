"""Model parts of a Qwen3-VL checkpoint for training (stage1.md §7.2): which part a parameter belongs to,
freezing, LoRA / DoRA through peft, and the optimizer's parameter groups. Knobs come from
:class:`ports.training.TrainerSettings` (``freeze_*``, ``vit_lr``, ``aligner_lr``, ``lora``)."""

from __future__ import annotations

from typing import Any

import torch

from adapters.hf.coord_offsets import attach_coord_offset_hooks
from ports.training import LoraSettings, TrainerSettings


def model_part(name: str) -> str:
    """The part a parameter or module name belongs to: ``vit``, ``aligner`` (any ``merger``) or ``llm``."""
    is_visual = ".visual." in f".{name}" or name.startswith("visual.")
    if not is_visual:
        return "llm"
    return "aligner" if "merger" in name else "vit"


def frozen_parts(training: TrainerSettings) -> frozenset[str]:
    """``training.freeze_vit`` / ``freeze_aligner`` / ``freeze_llm`` as the set of parts that must not change."""
    flags = {"vit": training.freeze_vit, "aligner": training.freeze_aligner, "llm": training.freeze_llm}
    return frozenset(part for part, frozen in flags.items() if frozen)


def freeze(model: Any, training: TrainerSettings) -> None:
    """Full fine-tuning knobs: freeze the vision tower / aligner / language model as configured."""
    frozen = frozen_parts(training)
    for name, param in model.named_parameters():
        param.requires_grad_(model_part(name) not in frozen)


def apply_lora(model: Any, lora: LoraSettings, *, coord_offsets: bool = False, frozen: frozenset[str] = frozenset()) -> Any:
    """``training.lora``: LoRA / DoRA adapters through peft (what ms-swift's tuners use); base weights frozen.

    No adapter goes on a module of a ``frozen`` part (``freeze_vit`` / ``freeze_aligner`` / ``freeze_llm``):
    they are listed in peft's ``exclude_modules``, so a frozen part stays bit-identical after a merge.
    With coord offsets the adapter module is saved with the LoRA weights (``modules_to_save``) and its hooks
    are re-attached to the active copy after wrapping (stage1.md §7.1).
    """
    from peft import LoraConfig, get_peft_model

    targets = list(lora.target_modules)
    excluded = sorted(
        name for name, module in model.named_modules()
        if name and model_part(name) in frozen and isinstance(module, torch.nn.Linear)
    )  # fmt: skip
    peft_config = LoraConfig(
        r=int(lora.rank),
        lora_alpha=int(lora.alpha),
        lora_dropout=float(lora.dropout),
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        exclude_modules=excluded or None,
        use_dora=bool(lora.use_dora),
        modules_to_save=(list(lora.modules_to_save) + (["coord_offset_adapter"] if coord_offsets else [])) or None,
        task_type="CAUSAL_LM",
    )
    wrapped = get_peft_model(model, peft_config)
    if coord_offsets:
        attach_coord_offset_hooks(wrapped)
    return wrapped


def optimizer_groups(model: Any, training: TrainerSettings) -> list[dict[str, Any]]:
    """stage1.md §7.2 groups 3: vision / aligner / language model, each split into decay and no-decay."""
    groups: dict[tuple[str, bool], list[Any]] = {}
    lrs = {
        "vit": training.vit_lr or training.learning_rate,
        "aligner": training.aligner_lr or training.learning_rate,
        "llm": training.learning_rate,
    }
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        part = model_part(name)
        no_decay = param.dim() < 2 or name.endswith(".bias") or "norm" in name.lower()
        groups.setdefault((part, no_decay), []).append(param)
    out = []
    for (part, no_decay), params in groups.items():
        out.append({"params": params, "lr": lrs[part], "weight_decay": 0.0 if no_decay else training.weight_decay})
    return out


