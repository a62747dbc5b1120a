"""Packing fill ratio vs padding, and encode / collate throughput, on a COCO-like length distribution.

Length model (stated, not measured on a real Qwen3-VL tokenizer):
- images: the sizes of the 100 COCO val2014 images of /work/shared/data/coco_val2014_100,
  smart-resized offline exactly like the converter does (multiples of 32, <= data.max_pixels
  786432), giving N = (H/32)*(W/32) vision placeholders;
- objects: each image's non-crowd annotations as bbox records, desc = category name, in canonical order;
- length = the project's own sample length (data.md §6.5, ``HFSampleEncoder.sample_length``) of the
  default prompt + CoordJSON target rendered with the tiny test checkpoint's tokenizer (512-token
  BPE, so text is longer than with Qwen's 151k vocabulary; vision tokens are exact);
- the dataset is N_SAMPLES draws (seeded, with replacement) from those 100 images.

Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_packing.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from adapters.hf.checkpoint import load_model_and_processor
from adapters.hf.encoding import HFSampleEncoder
from adapters.hf.tiny import TinyModelSettings, build_tiny_checkpoint, default_tiny_cache_dir
from adapters.torch.collator import ProjectCollator, TrainItem, model_rope_index
from domain.codec import bbox_pixels_to_bins
from domain.conversion import category_desc
from domain.coordjson import render
from domain.objects import DetObject, GeometryKind
from domain.ordering import sort_objects
from domain.packing import PackingSettings, plan_packs
from domain.prompts import build_prompt
from domain.resize import ImageSize, smart_resize
from ports.tokenizer import ChatSample, SampleOrigin

COCO = Path("/work/shared/data/coco_val2014_100/instances_val2014_100.json")
N_SAMPLES = 4096
SETTINGS = PackingSettings(max_length=12000, packing_buffer=512, packing_min_fill_ratio=0.65)
SEED = 0
PADDED_BATCH_SIZES = (1, 4, 8)
ENCODE_SAMPLES = 48


def coco_images() -> list[tuple[ImageSize, tuple[DetObject, ...]]]:
    data = json.loads(COCO.read_text())
    names = {c["id"]: category_desc(c["name"]) for c in data["categories"]}
    by_image: dict[int, list[dict[str, object]]] = {}
    for ann in data["annotations"]:
        if not ann.get("iscrowd"):
            by_image.setdefault(ann["image_id"], []).append(ann)
    out = []
    for img in sorted(data["images"], key=lambda i: i["id"]):
        w, h = int(img["width"]), int(img["height"])
        size = smart_resize(ImageSize(w, h))
        sx, sy = size.width / w, size.height / h
        objects = []
        for ann in by_image.get(img["id"], []):
            x, y, bw, bh = ann["bbox"]  # type: ignore[misc]
            box = [
                min(x * sx, size.width - 1),
                min(y * sy, size.height - 1),
                min((x + bw) * sx, size.width - 1),
                min((y + bh) * sy, size.height - 1),
            ]
            bins, _ = bbox_pixels_to_bins([round(v, 3) for v in box], size.width, size.height)
            objects.append(DetObject(names[ann["category_id"]], GeometryKind.BBOX, bins))
        out.append((size, sort_objects(objects)))
    return out


def padded_fill(lengths: list[int], batch: int, rng: np.random.Generator) -> float:
    order = rng.permutation(len(lengths))
    used = padded = 0
    for start in range(0, len(order), batch):
        chunk = [lengths[i] for i in order[start : start + batch]]
        used += sum(chunk)
        padded += len(chunk) * max(chunk)
    return used / padded


def main() -> None:
    checkpoint = build_tiny_checkpoint(TinyModelSettings(), default_tiny_cache_dir())
    loaded = load_model_and_processor(checkpoint, dtype="float32", attn_implementation="sdpa")
    encoder = HFSampleEncoder(loaded.processor, loaded.tokenizer)
    prompt = build_prompt("default", "tokens", "sorted", "desc_first")
    images = coco_images()
    chats = [
        ChatSample(
            prompt,
            f"img_{k}.png",
            size.width,
            size.height,
            render(objs),
            SampleOrigin("coco.jsonl", k + 1, k),
        )
        for k, (size, objs) in enumerate(images)
    ]
    base_lengths = encoder.checked_lengths(chats, SETTINGS.max_length)
    rng = np.random.default_rng(SEED)
    picks = rng.integers(0, len(chats), size=N_SAMPLES).tolist()
    lengths = [base_lengths[i] for i in picks]
    vision = [images[i][0].vision_tokens() for i in picks]

    print("== length model")
    print(
        f"images: {len(images)} COCO val2014 (smart-resized, max_pixels 786432); samples: {N_SAMPLES} draws"
    )
    print(
        f"length: mean {np.mean(lengths):.1f}, min {min(lengths)}, p50 {int(np.median(lengths))}, "
        f"max {max(lengths)}; vision tokens mean {np.mean(vision):.1f}; objects/image mean "
        f"{np.mean([len(o) for _, o in images]):.2f}, max {max(len(o) for _, o in images)}"
    )

    t0 = time.perf_counter()
    plan = plan_packs(lengths, SETTINGS, SEED)
    plan_s = time.perf_counter() - t0
    stats = plan.stats()
    tokens = sum(lengths)
    print("== packing (C=12000, B=512, f=0.65, drop_last=false)")
    print(
        f"packs {stats.packs}, samples/pack {stats.samples / stats.packs:.2f}, mean fill {stats.mean_fill:.4f}, "
        f"min fill {stats.min_fill:.4f}, final-step packs {stats.packs - plan.final_step_start}, "
        f"dropped {stats.dropped_samples}, plan time {plan_s:.2f} s"
    )
    print(f"token efficiency (real / processed): packed {tokens / (stats.packs * SETTINGS.max_length):.4f}")
    print("== padding (random batches, right-padded to the longest sample of the batch)")
    for b in PADDED_BATCH_SIZES:
        print(f"batch {b}: fill {padded_fill(lengths, b, np.random.default_rng(SEED)):.4f}")
    print(
        f"every sample padded to the global longest ({max(lengths)}): fill {np.mean(lengths) / max(lengths):.4f}"
    )

    print("== throughput (tiny checkpoint encoder; 2 shared CPU cores)")
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        noise = np.random.default_rng(1)
        subset = []
        for k in range(ENCODE_SAMPLES):
            c = chats[k % len(chats)]
            path = Path(tmp) / f"img_{k}.png"
            Image.fromarray(noise.integers(0, 255, size=(c.height, c.width, 3), dtype=np.uint8)).save(path)
            subset.append(
                (
                    ChatSample(c.prompt, str(path), c.width, c.height, c.target, c.origin),
                    images[k % len(chats)][1],
                )
            )
        t0 = time.perf_counter()
        items = [TrainItem(encoder.encode_sample(chat), objs) for chat, objs in subset]
        enc_s = time.perf_counter() - t0
    print(
        f"encode_sample: {ENCODE_SAMPLES / enc_s:.1f} samples/s ({enc_s / ENCODE_SAMPLES * 1000:.1f} ms/sample)"
    )
    collator = ProjectCollator(pad_id=loaded.tokenizer.pad_id, rope_index=model_rope_index(loaded.model))
    small = plan_packs([it.sample.length for it in items], SETTINGS, SEED)
    t0 = time.perf_counter()
    for pack in small.packs:
        collator.collate([[items[i] for i in pack.members]])
    col_s = time.perf_counter() - t0
    print(
        f"collate packed: {len(items) / col_s:.1f} samples/s over {len(small.packs)} pack(s) "
        f"({col_s / len(items) * 1000:.2f} ms/sample)"
    )


if __name__ == "__main__":
    main()
