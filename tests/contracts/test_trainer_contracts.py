"""Upstream behaviour the Stage-1 engine relies on (stage1.md §1.6), pinned on the installed versions.

If an upgrade of transformers / ms-swift changes one of these, the normalisation R1-R7 may silently change:
these tests fail first and name what moved.
"""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch
import transformers
from transformers import Trainer


def test_training_step_skips_the_accumulation_division_when_the_loss_is_prescaled() -> None:
    source = inspect.getsource(Trainer.training_step)
    assert "loss_is_scaled_for_ga" in source or "model_accepts_loss_kwargs" in source
    assert "num_items_in_batch is not None" in source
    assert "loss / self.current_gradient_accumulation_steps" in source


def test_deepspeed_backward_is_not_scaled_by_accumulation_steps() -> None:
    assert 'kwargs["scale_wrt_gas"] = False' in inspect.getsource(Trainer.training_step)


def test_window_prefetch_hook_exists_with_the_expected_signature() -> None:
    params = list(inspect.signature(Trainer.get_batch_samples).parameters)
    assert params == ["self", "epoch_iterator", "num_batches", "device"]


def test_n_gpu_dataparallel_would_average_the_loss() -> None:
    # the engine refuses n_gpu > 1 because of this line
    assert "loss.mean()" in inspect.getsource(Trainer.training_step)


def test_ms_swift_trainer_is_a_transformers_trainer_and_exposes_what_we_override() -> None:
    from swift import Seq2SeqTrainer, Seq2SeqTrainingArguments

    assert issubclass(Seq2SeqTrainer, Trainer)
    for name in ("compute_loss", "get_batch_samples", "_get_data_collator", "evaluate", "_save_checkpoint", "log"):
        assert hasattr(Seq2SeqTrainer, name), name
    fields = Seq2SeqTrainingArguments.__dataclass_fields__
    assert "use_logits_to_keep" in fields and "average_tokens_across_devices" in fields


def test_qwen3_vl_classes_exist_in_the_pinned_transformers() -> None:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    assert Qwen3VLForConditionalGeneration and Qwen3VLConfig and Qwen3VLProcessor
    assert transformers.__version__.split(".")[0] in {"4", "5"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_engine_accepts_scale_wrt_gas() -> None:
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    assert "kwargs" in str(inspect.signature(DeepSpeedEngineWrapper.backward))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attention_is_selectable() -> None:
    from transformers.utils import is_flash_attn_2_available

    assert is_flash_attn_2_available()
