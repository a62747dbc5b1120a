"""The run manifest ``run_metadata.json`` (infer-eval-config.md §6): one pure builder for train and infer runs.

Collection happens behind :class:`ports.provenance.ProvenanceCollector`; this module only arranges what the
collector reports, so it is tested with a fake collector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from application.config import redact
from ports.provenance import ProvenanceCollector

SCHEMA_VERSION = 1

PACKAGES: tuple[str, ...] = (
    "torch",
    "transformers",
    "vllm",
    "ms-swift",
    "attrs",
    "cattrs",
    "pyyaml",
    "faster-coco-eval",
    "pycocotools",
    "sentence-transformers",
    "accelerate",
    "deepspeed",
    "peft",
    "flash-attn",
)

ENV_WHITELIST: tuple[str, ...] = (
    "CUDA_VISIBLE_DEVICES",
    "NCCL_DEBUG",
    "TOKENIZERS_PARALLELISM",
    "PYTHONHASHSEED",
    "OMP_NUM_THREADS",
    "HF_HOME",
    "TORCH_HOME",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_JOB_ID",
    "SLURM_PROCID",
    "CONDA_DEFAULT_ENV",
    "CONDA_PREFIX",
)

KINDS = ("train", "infer_pipeline")


def _ms_swift_section(collector: ProvenanceCollector) -> dict[str, Any]:
    install_path = collector.module_dir("swift")
    section: dict[str, Any] = {"install_path": install_path, "checkout": None}
    if install_path is None:
        return section
    root = collector.checkout_root(install_path)
    if root is not None:
        git = collector.git(root)
        section["checkout"] = {
            "checkout_root": root,
            "sha": git.get("sha"),
            "branch": git.get("branch"),
            "dirty": git.get("dirty"),
        }
    return section


def _distributed(env: Mapping[str, str]) -> dict[str, Any]:
    section: dict[str, Any] = {"world_size": int(env.get("WORLD_SIZE", "1") or 1)}
    if "NODE_RANK" in env:
        section["node_rank"] = int(env["NODE_RANK"])
    if "SLURM_JOB_ID" in env:
        section["launcher"] = "slurm"
    elif "WORLD_SIZE" in env:
        section["launcher"] = "torchrun"
    else:
        section["launcher"] = "none"
    return section


def build_run_metadata(
    *,
    kind: str,
    collector: ProvenanceCollector,
    entry_point: str,
    argv: Sequence[str],
    config_path: str,
    extends_chain: Sequence[str],
    resolved_config_sha256: str,
    run_name: str,
    output_dir: str,
    run_dir: str,
    seed: int,
    project_dir: str,
    artifacts: Mapping[str, str] | None = None,
    rollout_server: Mapping[str, Any] | None = None,
    inference: Mapping[str, Any] | None = None,
    distributed_env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Everything of §6 except ``finished_at`` (null until :func:`mark_finished`)."""
    if kind not in KINDS:
        raise ValueError(f"run_metadata kind must be one of {list(KINDS)}, got {kind!r}")
    if list(argv[:1]) != ["--config"] or len(argv) != 2:
        raise ValueError(f"run_metadata argv must be ['--config', <path>], got {list(argv)!r}")
    env = dict(collector.environment(ENV_WHITELIST))
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "created_at": collector.now_utc(),
        "finished_at": None,
        "entry_point": entry_point,
        "argv": list(argv),
        "config_path": config_path,
        "config_path_abs": str(Path(config_path).resolve()),
        "extends_chain": list(extends_chain),
        "resolved_config_sha256": resolved_config_sha256,
        "run": {"name": run_name, "output_dir": output_dir, "run_dir": run_dir, "seed": seed},
        "git": dict(collector.git(project_dir)),
        "upstream": {
            "python": collector.python_version(),
            "platform": collector.platform(),
            "packages": {name: dict(collector.package(name)) for name in PACKAGES},
        },
        "ms_swift": _ms_swift_section(collector),
        "hardware": dict(collector.hardware()),
        "distributed": _distributed(distributed_env if distributed_env is not None else env),
        "rollout_server": dict(rollout_server) if rollout_server is not None else None,
        "inference": dict(inference) if inference is not None else None,
        "env": redact(env),
        "artifacts": dict(artifacts or {}),
    }


def mark_finished(metadata: Mapping[str, Any], collector: ProvenanceCollector) -> dict[str, Any]:
    """A copy with ``finished_at`` set, for the atomic rewrite at normal exit."""
    out = dict(metadata)
    out["finished_at"] = collector.now_utc()
    return out
