"""The largest-pack-first probe (issue 14 item 4): one forward + backward on the longest unit of a training
plan before step 1, its peak memory and time, and a located error when it does not fit.

Nothing here knows Stage 1. :func:`probe_step` takes a model, *a batch to run* and a loss callable (and a
:class:`MemoryMeter`); :func:`longest_unit` picks the unit from a plan's units and sample lengths. Stage 1's
glue (``adapters.swift.probe``) builds the batch from its dataset and collator and passes the trainer's own
``compute_loss``; Stage 2 can probe its longest allowed rollout the same way with its batch and loss.

The probe leaves the run as it found it: torch (CPU and CUDA), numpy and python RNG states are restored,
every parameter's ``.grad`` is put back (``None`` before step 1), every module's train/eval flag is
restored; there is no optimizer or scheduler step. Memory: on CUDA ``max_memory_allocated`` after
``reset_peak_memory_stats`` (absolute: weights, gradients and activations); on CPU the process RSS is
sampled in a background thread and the peak minus the RSS before the probe is reported (approximate).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import attrs
import numpy as np
import torch

from domain.errors import SetupError

GIB = 1024**3

LossFn = Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]
"""(model in train mode, a fresh copy of the batch on the model's device) -> the scalar to backward."""


# -------------------------------------------------------------------------------------------------
# Which unit


@attrs.frozen
class ProbeUnit:
    """The unit the probe runs: a pack (one packed row) or a padded batch of ``len(indices)`` rows.

    ``indices`` are record indices of the members (plan order for a pack, longest first for a batch),
    ``sample_ids`` their ``<jsonl>:<line>``, ``tokens`` the tokens the forward sees (a pack: the sum of its
    members; a padded batch: rows × the longest row), ``unit_index`` the pack's index in the plan.
    """

    kind: Literal["pack", "batch"]
    indices: tuple[int, ...]
    sample_ids: tuple[str, ...]
    tokens: int
    unit_index: int | None = None

    @property
    def samples(self) -> int:
        return len(self.indices)


def longest_unit(
    units: Sequence[Sequence[int]] | None,
    lengths: Sequence[int],
    sample_ids: Sequence[str],
    *,
    batch_size: int = 1,
) -> ProbeUnit:
    """The longest unit of a plan: the pack with the most tokens (the first of equals) when ``units`` is
    given, else the ``batch_size`` longest samples (a padded batch of them is the widest batch the run can
    meet: every row is padded to the longest). Raises ``SetupError`` on an empty plan."""
    if len(lengths) != len(sample_ids):
        raise SetupError(f"probe: {len(lengths)} lengths for {len(sample_ids)} sample ids")
    if units is not None:
        if not units:
            raise SetupError("probe: the pack plan is empty")
        totals = [sum(int(lengths[i]) for i in unit) for unit in units]
        best = max(range(len(units)), key=lambda k: (totals[k], -k))
        members = tuple(int(i) for i in units[best])
        return ProbeUnit("pack", members, tuple(sample_ids[i] for i in members), totals[best], best)
    if not lengths:
        raise SetupError("probe: the split has no samples")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    chosen = tuple(order[: max(1, int(batch_size))])
    width = max(int(lengths[i]) for i in chosen)
    return ProbeUnit("batch", chosen, tuple(sample_ids[i] for i in chosen), width * len(chosen))


# -------------------------------------------------------------------------------------------------
# Memory meters


class MemoryMeter(Protocol):
    """Measures the peak memory of the probe; injectable (tests pass one whose peak exceeds the budget)."""

    description: str

    def budget_bytes(self) -> int:
        """What the measured peak may reach."""
        ...

    def start(self) -> None: ...

    def stop(self) -> int:
        """The peak bytes since :meth:`start` (idempotent after the first call)."""
        ...


def _limit(limit_gb: float | None) -> int | None:
    return None if limit_gb is None else int(float(limit_gb) * GIB)


@attrs.define
class CudaMemoryMeter:
    """``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``: the absolute peak of tensors
    the caching allocator handed out (weights included). Budget: ``limit_bytes`` or the device's total memory."""

    device: torch.device
    limit_bytes: int | None = None
    description: str = "CUDA max_memory_allocated"
    _peak: int | None = None

    def budget_bytes(self) -> int:
        if self.limit_bytes is not None:
            return self.limit_bytes
        return int(torch.cuda.get_device_properties(self.device).total_memory)

    def start(self) -> None:
        self._peak = None
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> int:
        if self._peak is None:
            torch.cuda.synchronize(self.device)
            self._peak = int(torch.cuda.max_memory_allocated(self.device))
        return self._peak


def rss_bytes() -> int:
    """This process's resident set size (psutil when installed, else ``/proc/self/statm``)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.Process().memory_info().rss)


def _cgroup_headroom() -> int | None:
    """``memory.max - memory.current`` of this process's cgroup (v2), when limited."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def available_memory_bytes() -> int:
    """The system memory available now (``MemAvailable``), capped by the cgroup's headroom when limited."""
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except ImportError:
        available = 0
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    headroom = _cgroup_headroom()
    return available if headroom is None else min(available, headroom)


@attrs.define
class CpuRssMeter:
    """Samples the process RSS every ``interval_s`` in a background thread; the peak minus the RSS at
    :meth:`start` (approximate: the allocator may reuse freed pages or return them late). Budget:
    ``limit_bytes`` or the system memory available at the first call (capped by a cgroup limit)."""

    limit_bytes: int | None = None
    interval_s: float = 0.002
    description: str = "CPU RSS increase, approximate"
    read_rss: Callable[[], int] = rss_bytes
    _budget: int | None = None
    _baseline: int = 0
    _peak: int = 0
    _result: int | None = None
    _stop: threading.Event = attrs.field(factory=threading.Event)
    _thread: threading.Thread | None = None

    def budget_bytes(self) -> int:
        if self.limit_bytes is not None:
            return self.limit_bytes
        if self._budget is None:
            self._budget = available_memory_bytes()
        return self._budget

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self.read_rss())

    def start(self) -> None:
        self._result = None
        self._baseline = self._peak = self.read_rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="probe-rss", daemon=True)
        self._thread.start()

    def stop(self) -> int:
        if self._result is None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            self._peak = max(self._peak, self.read_rss())
            self._result = max(0, self._peak - self._baseline)
        return self._result


def device_meter(device: torch.device, limit_gb: float | None) -> MemoryMeter:
    """The meter of ``device``: CUDA peak allocation on a CUDA device, else sampled RSS."""
    if device.type == "cuda":
        return CudaMemoryMeter(device, _limit(limit_gb))
    return CpuRssMeter(_limit(limit_gb))


def adam_state_bytes(optimizer: Any) -> int:
    """Bytes Adam(W) allocates at its first step for parameters without state yet: ``exp_avg`` and
    ``exp_avg_sq`` (a third buffer with ``amsgrad``) in each trainable parameter's dtype. 0 without one."""
    if optimizer is None:
        return 0
    total = 0
    state = getattr(optimizer, "state", {})
    for group in getattr(optimizer, "param_groups", ()):
        buffers = 3 if group.get("amsgrad") else 2
        for p in group.get("params", ()):
            if isinstance(p, torch.Tensor) and p.requires_grad and p not in state:
                total += buffers * p.numel() * p.element_size()
    return total


# -------------------------------------------------------------------------------------------------
# The probe


@attrs.frozen
class ProbeReport:
    """What one probe measured: ``peak_bytes`` by the meter, ``extra_bytes`` the caller's estimate of what
    the step allocates later (optimizer state), ``budget_bytes`` the limit for their sum."""

    unit: ProbeUnit
    peak_bytes: int
    extra_bytes: int
    budget_bytes: int
    seconds: float
    meter: str

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes + self.extra_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def line(self) -> str:
        extra = f" (incl. {_gib(self.extra_bytes)} GiB optimizer state)" if self.extra_bytes else ""
        return (
            f"probe: longest {self.unit.kind} {self.unit.tokens} tokens ({_samples(self.unit.samples)}): "
            f"peak {_gib(self.total_bytes)} GiB{extra} of {_gib(self.budget_bytes)} GiB budget, "
            f"{self.seconds:.2f} s forward+backward [{self.meter}]"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.unit.kind,
            "unit_index": self.unit.unit_index,
            "tokens": self.unit.tokens,
            "samples": list(self.unit.sample_ids),
            "peak_bytes": self.peak_bytes,
            "extra_bytes": self.extra_bytes,
            "budget_bytes": self.budget_bytes,
            "seconds": self.seconds,
            "meter": self.meter,
            "fits": self.fits,
        }


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _samples(n: int) -> str:
    return f"{n} sample" if n == 1 else f"{n} samples"


def probe_failure_message(
    unit: ProbeUnit,
    *,
    peak_bytes: int | None,
    budget_bytes: int,
    extra_bytes: int = 0,
    cause: str | None = None,
    suggestions: Sequence[str] = (),
) -> str:
    """The located error: the unit's samples, its tokens, the peak (or the out-of-memory) and budget, what to change."""
    head = f"probe: the longest {unit.kind} of the plan does not fit"
    if unit.unit_index is not None:
        head += f" (pack {unit.unit_index})"
    parts = [f"{head}: {unit.tokens} tokens in {_samples(unit.samples)}: {', '.join(unit.sample_ids)}"]
    if peak_bytes is None:
        parts.append(f"out of memory during its forward + backward ({cause}); budget {_gib(budget_bytes)} GiB")
    else:
        extra = f" incl. {_gib(extra_bytes)} GiB optimizer state" if extra_bytes else ""
        parts.append(f"peak {_gib(peak_bytes + extra_bytes)} GiB{extra} > budget {_gib(budget_bytes)} GiB")
    if suggestions:
        parts.append("try: " + "; ".join(suggestions))
    return "\n".join(parts)


def is_out_of_memory(exc: BaseException) -> bool:
    """``torch.OutOfMemoryError``, ``MemoryError``, or an error saying out of memory (also as a cause)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (torch.OutOfMemoryError, MemoryError)):
            return True
        text = str(current).lower()
        if isinstance(current, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text):
            return True
        current = current.__cause__ or current.__context__
    return False


@attrs.frozen
class _RngStates:
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None
    numpy: Any
    python: Any

    @classmethod
    def capture(cls) -> _RngStates:
        initialized = torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
        cuda = torch.cuda.get_rng_state_all() if initialized else None
        return cls(torch.get_rng_state(), cuda, np.random.get_state(), random.getstate())

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def probe_step(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    loss_fn: LossFn,
    *,
    unit: ProbeUnit,
    meter: MemoryMeter,
    extra_bytes: int = 0,
    suggestions: Sequence[str] = (),
    device: torch.device | None = None,
) -> ProbeReport:
    """One forward + backward of ``batch`` through ``loss_fn`` in train mode, measured by ``meter``.

    ``batch`` is whatever ``loss_fn`` consumes (a collated mapping; tensors are moved to ``device``, by
    default the model's); ``loss_fn`` gets the model and a fresh copy of it and returns the scalar the
    trainer would backward (Stage 1: the trainer's ``compute_loss``; Stage 2: its loss on the longest allowed
    rollout). ``unit`` names what runs in the error. Raises ``SetupError`` (message:
    :func:`probe_failure_message`) when peak + ``extra_bytes`` exceeds ``meter.budget_bytes()`` or the step
    runs out of memory; other errors propagate with a note naming the unit. Makes no collective call itself, and restores RNG states,
    gradients and module modes on every path (no optimizer step is taken).
    """
    target = device if device is not None else _device_of(model)
    inputs = _to_device(batch, target)
    rng = _RngStates.capture()
    modes = [(m, m.training) for m in model.modules()]
    saved_grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
    budget = int(meter.budget_bytes())
    model.train()
    try:
        meter.start()
        started = time.perf_counter()
        try:
            loss = loss_fn(model, dict(inputs))
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward untyped
            if target.type == "cuda":
                torch.cuda.synchronize(target)
            seconds = time.perf_counter() - started
            del loss
        finally:
            peak = int(meter.stop())
    except BaseException as exc:
        if is_out_of_memory(exc):
            cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            raise SetupError(
                probe_failure_message(unit, peak_bytes=None, budget_bytes=budget, cause=cause, suggestions=suggestions)
            ) from exc
        if isinstance(exc, Exception):
            exc.add_note(
                f"raised by the largest-pack probe (one forward + backward of the longest {unit.kind}, "
                f"{', '.join(unit.sample_ids)}, before step 1)"
            )
        raise
    finally:
        for p, grad in saved_grads:
            p.grad = grad
        for module, mode in modes:
            module.training = mode
        rng.restore()
        if target.type == "cuda":
            torch.cuda.empty_cache()
    report = ProbeReport(unit, peak, int(extra_bytes), budget, seconds, meter.description)
    if not report.fits:
        raise SetupError(
            probe_failure_message(
                unit, peak_bytes=peak, budget_bytes=budget, extra_bytes=int(extra_bytes), suggestions=suggestions
            )
        )
    return report
