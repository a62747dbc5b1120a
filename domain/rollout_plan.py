"""Rollout seeding and request chunking over rollout servers (stage2.md §2.3, §16.3.4, §16.3.5).

Pure arithmetic, shared by every rollout backend and its tests:

- ``seed_base(run_seed, step) = (run_seed + step * 1000003) & 0x7FFFFFFF`` (§2.3);
- the seed of the requests starting at global index ``start``: ``(seed_base + start) & 0x7FFFFFFF``;
- ``N`` requests over ``S`` servers: ``chunk = ceil(N / S)``, server ``i`` gets ``[i*chunk, min((i+1)*chunk, N))``;
  empty chunks are absent (§16.3.4);
- a failing chunk of more than one request is split in half, each half keeping its own global start (§16.3.5).
"""

from __future__ import annotations

import attrs

SEED_MASK = 0x7FFFFFFF
SEED_STEP_FACTOR = 1000003


def seed_base(run_seed: int, global_step: int) -> int:
    """§2.3: ``run.seed = 42``, step 3 -> 3000051."""
    if global_step < 0:
        raise ValueError(f"global_step must be >= 0, got {global_step}")
    return (int(run_seed) + int(global_step) * SEED_STEP_FACTOR) & SEED_MASK


def request_seed(base: int, start: int) -> int:
    """The seed of a request (or a chunk) whose first global index is ``start``."""
    if start < 0:
        raise ValueError(f"a request index must be >= 0, got {start}")
    return (int(base) + int(start)) & SEED_MASK


@attrs.frozen
class Chunk:
    """Requests ``[start, stop)`` (global indices) sent to server ``server`` in one POST."""

    server: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def halves(self) -> tuple[Chunk, Chunk]:
        """The two halves a failing chunk is retried as (§16.3.5); the first half is the shorter one on odd sizes."""
        if self.size < 2:
            raise ValueError(f"a chunk of {self.size} request(s) cannot be split")
        middle = self.start + self.size // 2
        return Chunk(self.server, self.start, middle), Chunk(self.server, middle, self.stop)


def chunk_plan(n_requests: int, n_servers: int) -> tuple[Chunk, ...]:
    """The non-empty chunks of §16.3.4 in server order: (5, 2) -> [0, 3), [3, 5); (4, 3) -> [0, 2), [2, 4)."""
    if n_servers < 1:
        raise ValueError(f"need at least one server, got {n_servers}")
    if n_requests < 0:
        raise ValueError(f"the request count must be >= 0, got {n_requests}")
    if n_requests == 0:
        return ()
    size = -(-n_requests // n_servers)
    chunks = []
    for server in range(n_servers):
        start, stop = server * size, min((server + 1) * size, n_requests)
        if start < stop:
            chunks.append(Chunk(server, start, stop))
    return tuple(chunks)
