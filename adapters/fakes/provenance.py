"""A scripted provenance collector for tests of the run-manifest builder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs


@attrs.define
class FakeProvenanceCollector:
    git_result: Mapping[str, Any] = attrs.field(
        factory=lambda: {"sha": "0" * 40, "branch": "main", "dirty": False, "status_porcelain": []}
    )
    packages: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    module_dirs: Mapping[str, str] = attrs.field(factory=dict)
    env: Mapping[str, str] = attrs.field(factory=dict)
    hardware_result: Mapping[str, Any] = attrs.field(
        factory=lambda: {
            "cuda_available": False,
            "device_count": 0,
            "device_names": [],
            "torch_cuda_version": None,
            "cudnn_version": None,
        }
    )
    checkouts: Sequence[str] = ()
    clock: str = "2026-01-01T00:00:00.000000Z"
    git_calls: list[str] = attrs.field(factory=list)

    def python_version(self) -> str:
        return "3.11.7 (fake)"

    def platform(self) -> str:
        return "FakeOS-1.0"

    def git(self, directory: str) -> Mapping[str, Any]:
        self.git_calls.append(directory)
        return dict(self.git_result)

    def package(self, distribution: str) -> Mapping[str, Any]:
        return dict(self.packages.get(distribution, {"error": f"PackageNotFoundError: {distribution}"}))

    def module_dir(self, module: str) -> str | None:
        return self.module_dirs.get(module)

    def checkout_root(self, directory: str) -> str | None:
        for root in self.checkouts:
            if directory == root or directory.startswith(root.rstrip("/") + "/"):
                return root
        return None

    def hardware(self) -> Mapping[str, Any]:
        return dict(self.hardware_result)

    def environment(self, names: Sequence[str]) -> Mapping[str, str]:
        return {n: v for n, v in self.env.items() if n in names}

    def now_utc(self) -> str:
        return self.clock
