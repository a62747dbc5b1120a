"""Benchmark: the Stage-1 loss kernel vs a naive full-vocabulary implementation (one process, CPU).

    .venv/bin/python -m bench.bench_coord_loss [--vocab 152000 --length 2048 --coord-pairs 300]

Both compute the same λ (production settings: softCE ×3 + W1 + gate, τ 0.9, σ 1, R 8) and its
gradient w.r.t. the logits ``[1, L, V]`` (fp32). The naive version takes a full-vocabulary
log-softmax of every position (CE), a second full-vocabulary log-softmax with temperature of the
coord rows (gate), and W1 through a dense 1000×1000 CDF matrix.

Memory method (no CUDA here): peak resident memory of this process during forward + backward,
read from ``/proc/self/status`` (VmHWM) after resetting the peak with ``echo 5 >
/proc/self/clear_refs`` (Linux). The logits and labels exist before the reset, so the number is
the extra memory of the loss (including the logits' gradient, which both versions produce). Large
tensors are mmapped by glibc and unmapped when freed, so resident memory follows live tensors.
With CUDA available, ``torch.cuda.max_memory_allocated`` is used instead.

Prints times (best of ``--repeats``), peak memories and the ratios naive / ours, plus the
agreement of λ and of the gradients. Never used as a timed assertion in tests.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.torch.coord_loss import CoordLossKernel, lambda_for_backward, sanitize
from domain.coord_tokens import NUM_BINS, CoordIdTable
from domain.losses import PRODUCTION_SETTINGS, CoordLossSettings


def _proc_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"{field}:\s+(\d+) kB", text)
    return int(m.group(1)) * 1024 if m else 0


def measure(fn: Callable[[], None], device: torch.device) -> tuple[float, int]:
    """(seconds, peak extra bytes) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base
    base = _proc_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return dt, _proc_bytes("VmHWM") - base


def naive_lambda(
    logits: torch.Tensor, labels: torch.Tensor, bin_table: torch.Tensor, cols: torch.Tensor,
    targets: torch.Tensor, cfg: CoordLossSettings, n_step: int, c_step: int,
) -> torch.Tensor:
    z = logits[:, :-1].float()
    y = labels[:, 1:]
    sup = y != -100
    yc = y.clamp(min=0)
    bins_all = bin_table[yc]
    is_c = (bins_all >= 0) & sup
    logp = torch.log_softmax(z, dim=-1)  # full vocabulary, every position
    ce = -logp.gather(-1, yc.unsqueeze(-1)).squeeze(-1)
    sum_ce = ce[sup & ~is_c].sum()
    zc = sanitize(z[is_c])
    logp_tau = torch.log_softmax(zc / cfg.temperature, dim=-1)  # full vocabulary again, with τ
    gate = -torch.logsumexp(logp_tau[:, cols], dim=-1)
    s = zc[:, cols] / cfg.temperature
    lp = torch.log_softmax(s, dim=-1)
    p = torch.exp(lp)
    q = targets[bins_all[is_c]]
    cdf = torch.triu(torch.ones(NUM_BINS, NUM_BINS, dtype=p.dtype, device=p.device))  # dense CDF operator
    w1 = ((p - q) @ cdf).abs().sum(-1) / (NUM_BINS - 1)
    soft = -(q * lp).sum(-1)
    ell = cfg.soft_ce_weight * soft + cfg.w1_weight * w1 + cfg.gate_weight * gate
    return sum_ce / max(1, n_step) + ell.sum() / max(1, c_step)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=152_000)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--coord-pairs", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--chunk-mb", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab, length = args.vocab, args.length
    # Coord ids: a non-contiguous set near the end of the vocabulary, in a shuffled bin order.
    pool = torch.arange(vocab - 1500, vocab)
    coord_ids = pool[torch.randperm(pool.numel())[:NUM_BINS]].tolist()
    table = CoordIdTable(coord_ids)
    cfg = PRODUCTION_SETTINGS
    kernel = CoordLossKernel(table, cfg, chunk_bytes=args.chunk_mb * 1024 * 1024)

    labels = torch.randint(0, vocab - 1500, (1, length), device=device)
    labels[0, :16] = -100  # an unsupervised prompt
    coord_pos = 16 + torch.randperm(length - 16)[: args.coord_pairs]
    labels[0, coord_pos] = torch.tensor(coord_ids, device=device)[torch.randint(0, NUM_BINS, (args.coord_pairs,))]
    logits = torch.randn(1, length, vocab, device=device) * 2.0
    counts = kernel.count_pairs(labels, vocab)
    bin_table = kernel.bin_table(device, vocab)
    cols = kernel.coord_columns(device)
    targets = kernel.target_table(device)
    print(f"device {device.type}; logits [1, {length}, {vocab}] fp32 = {logits.numel() * 4 / 2**20:.0f} MiB; "
          f"|N| = {counts.noncoord}, |C| = {counts.coord}; chunk {args.chunk_mb} MiB; torch {torch.__version__}")

    results: dict[str, tuple[float, int, float, torch.Tensor]] = {}

    def run(name: str, compute: Callable[[torch.Tensor], torch.Tensor]) -> None:
        best_t, best_m = float("inf"), 0
        value, grad = float("nan"), torch.empty(0)
        for _ in range(args.repeats):
            leaf = logits.detach().requires_grad_(True)
            out: list[torch.Tensor] = []

            def step(z: torch.Tensor = leaf, sink: list[torch.Tensor] = out) -> None:
                lam = compute(z)
                lam.backward()
                sink.append(lam.detach())

            dt, mem = measure(step, device)
            best_t, best_m = min(best_t, dt), max(best_m, mem)
            value = float(out[0])
            assert leaf.grad is not None
            grad = leaf.grad
            del leaf, step
        results[name] = (best_t, best_m, value, grad)
        print(f"{name:>6}: {best_t:8.3f} s   peak +{best_m / 2**20:8.0f} MiB   λ = {value:.6f}")

    run("ours", lambda x: lambda_for_backward(kernel(x, labels), counts.noncoord, counts.coord, 1))
    ours_grad = results["ours"][3]  # kept (outside the naive run's measured peak) for the comparison
    run("naive", lambda x: naive_lambda(x, labels, bin_table, cols, targets, cfg, counts.noncoord, counts.coord))
    t_o, m_o, v_o, _ = results["ours"]
    t_n, m_n, v_n, g_n = results["naive"]
    print(f"time ratio naive/ours {t_n / t_o:.2f}x; peak-memory ratio naive/ours {m_n / max(1, m_o):.2f}x")
    print(f"|λ_ours − λ_naive| = {abs(v_o - v_n):.2e}; max |∇ours − ∇naive| = {float((ours_grad - g_n).abs().max()):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
