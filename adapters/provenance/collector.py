"""The real provenance collector: git subprocess, importlib.metadata, module specs, torch device facts."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import importlib.util
import os
import platform as _platform
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


def _error(exc: BaseException) -> dict[str, Any]:
    return {"error": f"{type(exc).__name__}: {exc}"}


def _git(directory: str, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", directory, *args], capture_output=True, text=True, timeout=20, check=True
    )
    return out.stdout


class SystemProvenanceCollector:
    def python_version(self) -> str:
        return sys.version

    def platform(self) -> str:
        return _platform.platform()

    def git(self, directory: str) -> Mapping[str, Any]:
        try:
            sha = _git(directory, "rev-parse", "HEAD").strip()
            branch = _git(directory, "rev-parse", "--abbrev-ref", "HEAD").strip()
            porcelain = _git(directory, "status", "--porcelain").splitlines()
            return {
                "sha": sha,
                "branch": branch,
                "dirty": bool(porcelain),
                "status_porcelain": porcelain[:200],
            }
        except Exception as exc:  # noqa: BLE001 - a probe reports its failure instead of raising
            return {"sha": None, "branch": None, "dirty": None, "status_porcelain": None, **_error(exc)}

    def package(self, distribution: str) -> Mapping[str, Any]:
        try:
            dist = importlib.metadata.distribution(distribution)
            location = str(dist.locate_file(""))
            return {"version": dist.version, "location": location}
        except Exception as exc:  # noqa: BLE001
            return _error(exc)

    def module_dir(self, module: str) -> str | None:
        try:
            spec = importlib.util.find_spec(module)
        except Exception:  # noqa: BLE001
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        return str(Path(list(spec.submodule_search_locations)[0]).resolve())

    def checkout_root(self, directory: str) -> str | None:
        path = Path(directory).resolve()
        for candidate in (path, *path.parents):
            if (candidate / ".git").exists():
                return str(candidate)
        return None

    def hardware(self) -> Mapping[str, Any]:
        try:
            import torch

            # torch leaves cudnn.version unannotated; it returns the version number or None
            cudnn_version: Callable[[], int | None] = torch.backends.cudnn.version
            available = bool(torch.cuda.is_available())
            count = torch.cuda.device_count() if available else 0
            return {
                "cuda_available": available,
                "device_count": count,
                "device_names": [torch.cuda.get_device_name(i) for i in range(count)],
                "torch_cuda_version": torch.version.cuda,
                "cudnn_version": cudnn_version() if available else None,
            }
        except Exception as exc:  # noqa: BLE001
            return _error(exc)

    def environment(self, names: Sequence[str]) -> Mapping[str, str]:
        return {n: os.environ[n] for n in names if n in os.environ}

    def now_utc(self) -> str:
        return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
