"""Benchmark: the Stage-1 loss from hidden states vs materialised logits (one process; issue 14 item 5).

    .venv/bin/python bench/bench_coord_loss_hidden.py [--vocab 152000 --hidden 256 --lengths 2048 8192]

(a) ``logits = hidden @ weight.T`` materialised ``[1, L, V]`` fp32, then the logits kernel
``CoordLossKernel.__call__``; (b) ``CoordLossKernel.from_hidden(hidden, weight, labels)``. Both
compute λ (production settings: softCE ×3 + W1 + gate, τ 0.9, σ 1, R 8; 90 % of positions
supervised, 15 % of them coord pairs) and its gradient w.r.t. ``hidden`` and ``weight`` (fp32,
no head offsets). Printed per L: time (best of ``--repeats``) and peak extra memory of each,
the ratios (b)/(a), and max |Δλ|, max |Δ∇hidden|, max |Δ∇weight|.

Memory method (no CUDA here): peak resident memory of this process during forward + backward,
read from ``/proc/self/status`` (VmHWM) after resetting the high-water mark with ``echo 5 >
/proc/self/clear_refs`` (Linux), minus VmRSS just before. Hidden states, weight and labels exist
before the reset, so the number is the extra memory of the loss and its backward, including the
gradient buffers of hidden and weight that both versions produce (torch's caching is not involved
on CPU: large tensors are mmapped by glibc and unmapped when freed, so RSS follows live tensors;
``tracemalloc`` does not see torch's allocations at all). With CUDA, ``torch.cuda.max_memory_allocated``.

Results on this machine (CPU, 2 cores shared with other sessions, torch 2.14.1, fp32, one run each;
the load of the shared cores moves times by up to ±40 % between runs, so read the ratios).
H = 256 instead of 2048: at H = 2048 one L = 8192, V = 152k matmul is 5 TFLOP (many minutes on 2
cores) and the weight alone 1.2 GB; the logits-side memory does not depend on H. (a) at L = 8192
with V = 152k needs the logits and their gradient, 2 × 4.6 GiB, beyond the ~8 GiB this session
may use (reducing H does not help), so L = 8192 is measured with V = 32k for (a) vs (b), and (b)
alone at V = 152k.

    --chunk-mb 64 (the sweet spot here):
    V=152000 L=2048:  (a) 4.74 s +2545 MiB   (b) 7.07 s +332 MiB   time 1.49x  memory 1/7.7
                      |Δλ| 0, max|Δ∇h| 0, max|Δ∇W| 2.0e-08
    V=32000  L=8192:  (a) 11.12 s +2087 MiB  (b) 12.71 s +192 MiB  time 1.14x  memory 1/10.9
                      |Δλ| 0, max|Δ∇h| 0, max|Δ∇W| 6.5e-09
    --chunk-mb 32:
    V=152000 L=2048:  (a) 10.30 s +2384 MiB  (b) 19.00 s +256 MiB  time 1.84x  memory 1/9.3
    V=32000  L=8192:  (a) 11.13 s +2036 MiB  (b) 16.89 s +150 MiB  time 1.52x  memory 1/13.6
    V=152000 L=8192:  (b) only 67.8 s +296 MiB   ((a) would need ≳ 9.3 GiB)
    --chunk-mb 64, quiet machine, 16 GiB free (`--lengths 8192 --repeats 1`):
    V=152000 L=8192:  (a) 31.03 s +9673 MiB  (b) 22.73 s +328 MiB   time 0.73x  memory 1/29.4
                      |Δλ| 0, max|Δ∇h| 0, max|Δ∇W| 7.0e-09
    --chunk-mb 96:
    V=152000 L=2048:  (a) 14.45 s +2595 MiB  (b) 13.56 s +432 MiB  time 0.94x  memory 1/6.0

(b)'s extra memory is the weight's gradient (148 MiB at V=152k, H=256; both versions have it)
plus a few chunk-sized buffers; (a)'s is the logits and their gradient. (b) does one more
chunk matmul (the backward recomputes h·Wᵀ), so bigger chunks trade memory for matmul efficiency.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters.torch.coord_loss import CoordLossKernel, lambda_for_backward
from domain.coord_tokens import NUM_BINS, CoordIdTable
from domain.losses import PRODUCTION_SETTINGS

from bench_coord_loss import measure  # one owner of the time / peak-memory method


Result = tuple[float, int, float, torch.Tensor | None, torch.Tensor | None]


def bench_one(vocab: int, hidden_size: int, length: int, repeats: int, chunk_mb: int, with_logits: bool,
              device: torch.device) -> None:
    gen = torch.Generator().manual_seed(length)
    pool = torch.arange(vocab - 1500, vocab)
    coord_ids = pool[torch.randperm(pool.numel(), generator=gen)[:NUM_BINS]].tolist()
    kernel = CoordLossKernel(CoordIdTable(coord_ids), PRODUCTION_SETTINGS, chunk_bytes=chunk_mb * 1024 * 1024,
                             liger=False)
    labels = torch.randint(0, vocab - 1500, (1, length), generator=gen)
    labels[torch.rand(1, length, generator=gen) > 0.9] = -100
    is_c = (torch.rand(1, length, generator=gen) < 0.15) & (labels != -100)
    labels[is_c] = torch.tensor(coord_ids)[torch.randint(0, NUM_BINS, (int(is_c.sum()),), generator=gen)]
    labels = labels.to(device)
    hidden = torch.randn(1, length, hidden_size, generator=gen).to(device)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).to(device)
    counts = kernel.count_pairs(labels, vocab)
    print(f"V={vocab} H={hidden_size} L={length}: |N| = {counts.noncoord}, |C| = {counts.coord}; "
          f"logits [1, L, V] fp32 = {length * vocab * 4 / 2**20:.0f} MiB; weight {vocab * hidden_size * 4 / 2**20:.0f} MiB; "
          f"chunk {chunk_mb} MiB")

    def run(name: str, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Result:
        best_t, best_m, value = float("inf"), 0, float("nan")
        gh: torch.Tensor | None = None
        gw: torch.Tensor | None = None
        for _ in range(repeats):
            h = hidden.detach().requires_grad_(True)
            w = weight.detach().requires_grad_(True)
            out: list[torch.Tensor] = []

            def step(h: torch.Tensor = h, w: torch.Tensor = w, sink: list[torch.Tensor] = out) -> None:
                lam = loss(h, w)
                lam.backward()
                sink.append(lam.detach())

            dt, mem = measure(step, device)
            best_t, best_m = min(best_t, dt), max(best_m, mem)
            value, gh, gw = float(out[0]), h.grad, w.grad
            del h, w, step
        print(f"  {name}: {best_t:8.2f} s   peak +{best_m / 2**20:7.0f} MiB   λ = {value:.6f}")
        return best_t, best_m, value, gh, gw

    def lam_logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return lambda_for_backward(kernel(h @ w.T, labels), counts.noncoord, counts.coord, 1)

    def lam_hidden(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return lambda_for_backward(kernel.from_hidden(h, w, labels), counts.noncoord, counts.coord, 1)

    b = run("(b) hidden path ", lam_hidden)
    if not with_logits:
        print("  (a) skipped (--no-logits-at this size)")
        return
    a = run("(a) logits+kernel", lam_logits)
    assert a[3] is not None and a[4] is not None and b[3] is not None and b[4] is not None
    print(f"  (b)/(a): time {b[0] / a[0]:.2f}x, peak memory {b[1] / max(1, a[1]):.3f} (1/{a[1] / max(1, b[1]):.1f})")
    print(f"  |Δλ| {abs(a[2] - b[2]):.1e}, max|Δ∇hidden| {float((a[3] - b[3]).abs().max()):.1e}, "
          f"max|Δ∇weight| {float((a[4] - b[4]).abs().max()):.1e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=152_000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--chunk-mb", type=int, default=64)
    ap.add_argument("--no-logits-at", type=int, nargs="*", default=[],
                    help="lengths at which (a) is skipped (its logits would not fit in memory)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device.type}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    for length in args.lengths:
        bench_one(args.vocab, args.hidden, length, args.repeats, args.chunk_mb, length not in args.no_logits_at, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
