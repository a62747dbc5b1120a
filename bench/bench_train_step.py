"""Benchmark: one Stage-1 training micro-step of ours vs a raw transformers forward + backward (CPU, one process).

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 USE_HF=1 \\
        .venv/bin/python -m bench.bench_train_step [--repeats 40 --warmup 5 --pack-size 4 --attn sdpa]

Model: the embedded tiny Qwen3-VL (``adapters.hf.tiny.build_tiny_checkpoint``) with a larger text
tower (hidden 256, 4 layers, 4 heads of 64, intermediate 512; vocab 1472 and the default tiny vision
tower), built into a temporary directory and loaded in float32 through the real-checkpoint path.

Batch: ``--pack-size`` samples (the shapes3 images, 256x256, 64 vision tokens each, with their three
boxes rendered by ``domain.coordjson.render``), encoded by ``HFSampleEncoder`` and collated by
``ProjectCollator`` into ONE packed row, exactly as the Stage-1 dataset + collator produce it.

Contestants, on the same collated batch and the same model, interleaved per repetition (A, B, C, D,
then B, A, C, D, ...: A and B swap places every other round so neither always runs first) after
``--warmup`` untimed rounds; gradients are cleared (set to None) and ``gc.collect()`` runs before each:

A  ours: what ``CoordExpStage1Trainer`` does per micro-batch with a window of one micro-batch: the R6
   pre-pass ``window_counts``, ``pop_step_context``, ``model(**inputs)`` without labels, the logits
   shape check, ``Stage1Runtime.loss`` (-> ``CoordLossKernel``), ``lambda_for_backward``, the
   ``Stage1Runtime.record_metrics`` (``objective_metric_updates`` into the train ``MetricAccumulator``),
   ``observe_instability`` / ``exchange_stop`` (no-ops with the monitor off, the default), the
   finiteness check, then ``backward``. Timed by phase (forward / loss / lambda+metrics / backward).
B  raw: ``model(**model_inputs, labels=labels)`` with transformers' built-in causal-LM loss, then
   ``backward``.
C  our loss alone: the same ``Stage1Runtime.loss`` + ``lambda_for_backward`` + ``record_metrics`` and
   the backward of λ, on a detached leaf copy of the batch's logits (no model).
D  transformers' loss alone: ``model.loss_function`` + its backward on the same leaf logits.

C and D explain the A / B ratio: A - B ≈ (C - D) when the model forward and backward are equal.
Prints medians, quartiles and min per contestant, the ratio of medians and the median of the
per-repetition paired ratios A_i / B_i (robust to load drifting over the run). The target is
ours / raw <= 1.10. Never used as a timed assertion in tests.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("USE_HF", "1")

import attrs
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.hf.checkpoint import load_model_and_processor
from adapters.hf.encoding import HFSampleEncoder
from adapters.hf.tiny import build_tiny_checkpoint
from adapters.swift.stage1_runtime import Stage1Runtime, window_counts
from adapters.torch.collator import ProjectCollator, TrainItem, model_rope_index
from adapters.torch.coord_loss import CoordLossKernel, lambda_for_backward
from adapters.torch.instability import InstabilityRunner
from adapters.torch.step_context import pop_step_context
from domain.batch_extras import EXTRA_KEYS, LABELS_KEY
from domain.codec import bbox_pixels_to_bins
from domain.coordjson import render
from domain.errors import StepError
from domain.losses import CoordLossSettings
from domain.objects import CoordMode, DetObject, FieldOrder, GeometryKind
from domain.ordering import sort_objects
from domain.prompts import build_prompt
from ports.tokenizer import ChatSample, SampleOrigin

SHAPES = Path("/work/shared/data/shapes3")

# The model.tiny block of the benchmark model (TinyModelSettings shape): a bigger text tower, small vocab and vision.
TINY_SETTINGS: dict[str, Any] = {
    "seed": 0,
    "text": {
        "vocab_size": 1472,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "mrope_section": [12, 10, 10],
    },
}

# objective.coord_soft_ce_w1 of configs/base/stage1.yaml (the Stage-1 default).
LOSS_SETTINGS = CoordLossSettings(
    enabled=True,
    ce_weight=0.0,
    soft_ce_weight=1.0,
    w1_weight=1.0,
    gate_weight=1.0,
    temperature=1.0,
    target_sigma=2.0,
    target_truncate=16,
)
MAX_META_SAMPLES = 16  # objective.instability_monitor.max_meta_samples default; the engine always passes it


class _NullSink:
    """A MetricSink that drops events (the benchmark never logs)."""

    def log(self, event: Mapping[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


# -------------------------------------------------------------------------------------------------
# Data: shapes3 images with their boxes, encoded and packed by the project's own code


def shapes3_samples(image_dir: Path) -> list[tuple[ChatSample, tuple[DetObject, ...]]]:
    gt = json.loads((SHAPES / "gt_dataset.json").read_text())
    names = {c["id"]: c["name"] for c in gt["categories"]}
    prompt = build_prompt("default", CoordMode.TOKENS, "sorted", FieldOrder.DESC_FIRST)
    out = []
    for index, image in enumerate(gt["images"]):
        w, h = int(image["width"]), int(image["height"])
        objects = []
        for ann in gt["annotations"]:
            if ann["image_id"] != image["id"]:
                continue
            x, y, bw, bh = ann["bbox"]
            bins, _ = bbox_pixels_to_bins((x, y, x + bw, y + bh), w, h)
            objects.append(DetObject(names[ann["category_id"]], GeometryKind.BBOX, bins))
        ordered = sort_objects(objects)
        path = image_dir / image["file_name"]
        shutil.copy(SHAPES / image["file_name"], path)
        sample = ChatSample(
            prompt=prompt,
            image_path=str(path),
            width=w,
            height=h,
            target=render(ordered, FieldOrder.DESC_FIRST, CoordMode.TOKENS),
            origin=SampleOrigin(source="shapes3/train.jsonl", line=index + 1, record_index=index),
        )
        out.append((sample, ordered))
    return out


def packed_batch(
    encoder: HFSampleEncoder, collator: ProjectCollator, image_dir: Path, pack_size: int
) -> dict[str, Any]:
    """One packed micro-batch of ``pack_size`` members, as ``Stage1Dataset`` + ``ProjectCollator`` make it."""
    samples = shapes3_samples(image_dir)
    pack = [
        TrainItem(encoder.encode_sample(s), objs)
        for s, objs in (samples[k % len(samples)] for k in range(pack_size))
    ]
    return collator([pack])


# -------------------------------------------------------------------------------------------------
# The contestants


Timings = dict[str, float]


@attrs.define
class _TrainerView:
    """The trainer attributes ``Stage1Runtime``'s monitor hooks read (unused while the monitor is off)."""

    state: Any = attrs.field(factory=lambda: SimpleNamespace(global_step=0, epoch=0.0))
    args: Any = attrs.field(factory=lambda: SimpleNamespace(device=torch.device("cpu")))
    control: Any = None
    optimizer: Any = None
    lr_scheduler: Any = None


def ours_step(model: Any, runtime: Stage1Runtime, trainer: _TrainerView, batch: Mapping[str, Any]) -> Timings:
    """One micro-batch of ``CoordExpStage1Trainer`` (the get_batch_samples pre-pass, compute_loss, backward).

    Mirrors ``compute_loss`` of adapters/swift/stage1_trainer.py in training mode, line for line, calling the
    runtime's own methods; keep it in step with that method when it changes.
    """
    inputs = dict(batch)  # the trainer receives a fresh mapping per micro-batch
    t0 = time.perf_counter()
    window = window_counts([inputs], runtime.coord_mask)  # R6 pre-pass over a window of one micro-batch
    window_len = 1
    inputs.pop("compute_loss_func", None)
    ctx = pop_step_context(inputs)
    if "logits_to_keep" in inputs:
        raise StepError("logits_to_keep reached the model")
    seq_len = int(inputs["input_ids"].shape[1])
    outputs = model(**inputs)
    if outputs.logits is not None and int(outputs.logits.shape[1]) != seq_len:
        raise StepError("sliced logits")
    t1 = time.perf_counter()
    result = runtime.loss(outputs.logits, ctx, trainer.state.global_step)
    t2 = time.perf_counter()
    n_step, c_step, t_step = (int(v) for v in window.tolist())
    if not result.distributional:
        n_step = t_step
    lam = lambda_for_backward(result, n_step, c_step, runtime.world_size)
    runtime.record_metrics(result, ctx, train=True, window_len=window_len)
    decision = runtime.observe_instability(trainer, result, ctx, training=True)
    if decision.guard:
        lam = InstabilityRunner.guarded_loss(result)
    runtime.exchange_stop(trainer, decision)
    if not bool(torch.isfinite(lam.detach())):
        raise StepError(f"non-finite loss for samples {runtime.describe(ctx)}")
    t3 = time.perf_counter()
    lam.backward()  # type: ignore[no-untyped-call]
    t4 = time.perf_counter()
    return {
        "total": t4 - t0,
        "forward": t1 - t0,
        "loss": t2 - t1,
        "lambda_metrics": t3 - t2,
        "backward": t4 - t3,
    }


def raw_step(model: Any, batch: Mapping[str, Any]) -> Timings:
    """transformers' own path: the model's causal-LM loss on the same packed row, then backward."""
    inputs = {k: v for k, v in batch.items() if k not in EXTRA_KEYS and k != LABELS_KEY}
    labels = batch[LABELS_KEY]
    t0 = time.perf_counter()
    outputs = model(**inputs, labels=labels)
    t1 = time.perf_counter()
    outputs.loss.backward()
    t2 = time.perf_counter()
    return {"total": t2 - t0, "forward": t1 - t0, "backward": t2 - t1}


def ours_loss_alone(runtime: Stage1Runtime, logits: torch.Tensor, batch: Mapping[str, Any]) -> Timings:
    inputs = dict(batch)
    leaf = logits.detach().requires_grad_(True)
    t0 = time.perf_counter()
    window = window_counts([inputs], runtime.coord_mask)
    ctx = pop_step_context(inputs)
    result = runtime.loss(leaf, ctx, 0)
    n_step, c_step, _ = (int(v) for v in window.tolist())
    lam = lambda_for_backward(result, n_step, c_step, runtime.world_size)
    if not bool(torch.isfinite(lam.detach())):
        raise StepError("non-finite loss")
    runtime.record_metrics(result, ctx, train=True, window_len=1)
    t1 = time.perf_counter()
    lam.backward()  # type: ignore[no-untyped-call]
    t2 = time.perf_counter()
    return {"total": t2 - t0, "forward": t1 - t0, "backward": t2 - t1}


def raw_loss_alone(model: Any, logits: torch.Tensor, labels: torch.Tensor) -> Timings:
    leaf = logits.detach().requires_grad_(True)
    vocab = int(model.config.text_config.vocab_size)
    t0 = time.perf_counter()
    loss = model.loss_function(logits=leaf, labels=labels, vocab_size=vocab)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return {"total": t2 - t0, "forward": t1 - t0, "backward": t2 - t1}


# -------------------------------------------------------------------------------------------------
# Statistics and report


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def describe(name: str, xs: Sequence[float]) -> str:
    q1, med, q3 = quartiles(xs)
    return (
        f"  {name:<38} median {med * 1e3:8.2f} ms   IQR [{q1 * 1e3:8.2f}, {q3 * 1e3:8.2f}]   "
        f"min {min(xs) * 1e3:8.2f}   spread (IQR/median) {100 * (q3 - q1) / med:5.1f}%"
    )


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench_train_step_"))
    try:
        checkpoint = build_tiny_checkpoint(TINY_SETTINGS, work / "tiny")
        loaded = load_model_and_processor(
            checkpoint, dtype="float32", attn_implementation=args.attn, device="cpu"
        )
        model, processor = loaded.model, loaded.processor
        model.train()
        vocab = loaded.logits_vocab_size
        encoder = HFSampleEncoder(processor, loaded.tokenizer)
        collator = ProjectCollator(
            pad_id=loaded.tokenizer.pad_id,
            rope_index=model_rope_index(model),
            max_meta_samples=MAX_META_SAMPLES,
        )
        image_dir = work / "images"
        image_dir.mkdir()
        batch = packed_batch(encoder, collator, image_dir, args.pack_size)
        table = loaded.coord_ids
        runtime = Stage1Runtime(
            coord_table=table,
            kernel=CoordLossKernel(table, LOSS_SETTINGS),
            collator=collator,
            coord_mask=torch.as_tensor(table.mask(vocab)),
            run_dir=work,
            max_steps=-1,
            sink=_NullSink(),
            resolved_config_path=work / "resolved_config.json",
            processor=processor,
            world_size=1,
        )
        labels = batch[LABELS_KEY]
        counts = window_counts([batch], runtime.coord_mask)
        with torch.no_grad():
            inputs = {k: v for k, v in batch.items() if k not in EXTRA_KEYS and k != LABELS_KEY}
            logits = model(**inputs).logits.detach().clone()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

        print(
            "bench_train_step: one Stage-1 micro-step (ours) vs raw transformers forward+backward, same packed row"
        )
        print(
            f"  torch {torch.__version__}, threads {torch.get_num_threads()}, attn {loaded.attn_implementation_selected}, "
            f"float32 CPU; model {trainable / 1e6:.2f} M trainable params (text hidden 256 x 4 layers, vocab {vocab})"
        )
        print(
            f"  packed row: {args.pack_size} members, {int(labels.shape[1])} tokens, pixel_values "
            f"{list(batch['pixel_values'].shape)}; supervised T={int(counts[2])} (N={int(counts[0])}, C={int(counts[1])})"
        )
        print(
            f"  warm-up {args.warmup} rounds, then {args.repeats} interleaved rounds (A,B | B,A alternating, then C,D)"
        )

        def cleared(fn: Callable[[], Timings]) -> Timings:
            model.zero_grad(set_to_none=True)
            gc.collect()
            return fn()

        trainer = _TrainerView()
        rounds: list[tuple[Timings, Timings, Timings, Timings]] = []
        for r in range(args.warmup + args.repeats):
            trainer.state.global_step = r
            # A and B swap places every other round (A B, B A, A B, ...) so neither always goes first.
            if r % 2 == 0:
                a = cleared(lambda: ours_step(model, runtime, trainer, batch))
                b = cleared(lambda: raw_step(model, batch))
            else:
                b = cleared(lambda: raw_step(model, batch))
                a = cleared(lambda: ours_step(model, runtime, trainer, batch))
            c = cleared(lambda: ours_loss_alone(runtime, logits, batch))
            d = cleared(lambda: raw_loss_alone(model, logits, labels))
            if r >= args.warmup:
                rounds.append((a, b, c, d))
            runtime.train_acc.reset()
        model.zero_grad(set_to_none=True)

        col = {k: [rd[i]["total"] for rd in rounds] for i, k in enumerate("ABCD")}
        print("\nper micro-step (wall clock):")
        print(describe("A ours (full step)", col["A"]))
        for phase in ("forward", "loss", "lambda_metrics", "backward"):
            print(describe(f"    A.{phase}", [rd[0][phase] for rd in rounds]))
        print(describe("B raw (full step)", col["B"]))
        for phase in ("forward", "backward"):
            print(describe(f"    B.{phase} (loss in fwd)", [rd[1][phase] for rd in rounds]))
        print(describe("C our loss alone (fwd+metrics+bwd)", col["C"]))
        print(describe("    C.forward+metrics", [rd[2]["forward"] for rd in rounds]))
        print(describe("    C.backward", [rd[2]["backward"] for rd in rounds]))
        print(describe("D transformers loss alone (fwd+bwd)", col["D"]))

        med = {k: statistics.median(v) for k, v in col.items()}
        paired = [a / b for a, b in zip(col["A"], col["B"])]
        p1, pm, p3 = quartiles(paired)
        print("\noverhead ours / raw (target <= 1.10):")
        print(f"  ratio of medians                  {med['A'] / med['B']:.3f}")
        print(
            f"  paired ratio A_i/B_i: median      {pm:.3f}   IQR [{p1:.3f}, {p3:.3f}]   min {min(paired):.3f}"
        )
        print("\nwhere the time goes (medians):")
        print(f"  our loss kernel + λ + metrics (C) = {100 * med['C'] / med['A']:5.1f}% of ours (A)")
        print(f"  transformers' loss (D)            = {100 * med['D'] / med['B']:5.1f}% of raw (B)")
        rest = med["A"] - med["C"]
        print(
            f"  model forward+backward without loss: ours A-C = {rest * 1e3:.2f} ms, raw B-D = "
            f"{(med['B'] - med['D']) * 1e3:.2f} ms"
        )
        print(
            f"  predicted ratio from the parts (B - D + C) / B = {(med['B'] - med['D'] + med['C']) / med['B']:.3f}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=40, help="timed interleaved rounds (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    parser.add_argument("--pack-size", type=int, default=4, help="samples in the packed row (default 4)")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attention implementation")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be >= 2 (quartiles)")
    run(args)


if __name__ == "__main__":
    main()
