"""The run manifest ``run_metadata.json`` (infer-eval-config.md §6): one pure builder for train and infer runs.

Collection happens behind :class:`ports.provenance.ProvenanceCollector`; this module only arranges what the
collector reports, so it is tested with a fake collector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

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


@attrs.frozen
class RolloutServerFacts:
    """One ``swift rollout`` server as the learner saw it (infer-eval-config.md §7.4).

    ``engine`` is the server's ``/get_engine_type/`` answer; ``argv`` the launch command when the project started it.
    """

    base_url: str
    group_port: int
    reported_world_size: int | None = None
    engine: Mapping[str, object] | None = None
    argv: tuple[str, ...] | None = None


@attrs.frozen
class RolloutServerProvenance:
    """``run_metadata.rollout_server``: ``source`` launcher | external, the servers, the launch ``flags`` (null when
    external)."""

    source: Literal["launcher", "external"]
    servers: tuple[RolloutServerFacts, ...]
    flags: Mapping[str, object] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "servers": [
                {
                    "base_url": s.base_url,
                    "group_port": s.group_port,
                    "reported_world_size": s.reported_world_size,
                    "engine": dict(s.engine) if s.engine is not None else None,
                    "argv": _redacted_argv(s.argv) if s.argv is not None else None,
                }
                for s in self.servers
            ],
            "flags": dict(self.flags) if self.flags is not None else None,
        }

    @classmethod
    def from_backend(
        cls, described: Mapping[str, Any], launch_record: Mapping[str, Any] | None = None
    ) -> RolloutServerProvenance:
        """From the rollout client's ``describe()`` (engine answers, world sizes) and, when the project launched
        the servers, its ``rollout_server_launch.json`` record (argv per server, ``flags``)."""
        launched = {str(s.get("base_url")): s for s in (launch_record or {}).get("servers", [])}
        servers = []
        for entry in described.get("servers", []):
            url = str(entry["base_url"])
            argv = launched.get(url, {}).get("argv")
            servers.append(
                RolloutServerFacts(
                    base_url=url,
                    group_port=int(entry["group_port"]),
                    reported_world_size=entry.get("world_size"),
                    engine=entry.get("engine"),
                    argv=tuple(str(a) for a in argv) if argv is not None else None,
                )
            )
        flags = launch_record.get("flags") if launch_record is not None else None
        source: Literal["launcher", "external"] = "launcher" if launch_record is not None else "external"
        return cls(source=source, servers=tuple(servers), flags=flags)


SECRET_FLAGS = ("--api_key", "--api-key")


def _redacted_argv(argv: Sequence[str]) -> list[str]:
    """A launch command with the value of ``--api_key`` (either spelling, ``=`` form too) replaced."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("<redacted>")
            hide_next = False
        elif arg in SECRET_FLAGS:
            out.append(arg)
            hide_next = True
        elif arg.split("=", 1)[0] in SECRET_FLAGS and "=" in arg:
            out.append(arg.split("=", 1)[0] + "=<redacted>")
        else:
            out.append(arg)
    return out


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
    rollout_server: RolloutServerProvenance | Mapping[str, Any] | None = None,
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
        "rollout_server": _rollout_server_json(rollout_server),
        "inference": dict(inference) if inference is not None else None,
        "env": redact(env),
        "artifacts": dict(artifacts or {}),
    }


def _rollout_server_json(value: RolloutServerProvenance | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    return value.to_json() if isinstance(value, RolloutServerProvenance) else dict(value)


def mark_finished(metadata: Mapping[str, Any], collector: ProvenanceCollector) -> dict[str, Any]:
    """A copy with ``finished_at`` set, for the atomic rewrite at normal exit."""
    out = dict(metadata)
    out["finished_at"] = collector.now_utc()
    return out
