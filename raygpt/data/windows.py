"""Cut a stream of token chunks into (block_size + 1)-token training windows and batch them.

Pure numpy/torch: the Ray worker feeds it the rows of its dataset shard, tests feed it lists. Windows
are non-overlapping (stride block_size: every token is a target once per epoch) and shuffled within a
seeded buffer, so a worker never waits on a global shuffle.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch


def windows(chunks: Iterable[np.ndarray], block_size: int) -> Iterator[np.ndarray]:
    """Consecutive (block_size + 1)-token windows over the concatenated chunks; window i starts at
    i * block_size, so its last token is the next window's first (the target of its last position)."""
    carry = np.zeros(0, dtype=np.int64)
    for chunk in chunks:
        buf = np.concatenate([carry, np.asarray(chunk, dtype=np.int64)])
        n = (len(buf) - 1) // block_size  # full windows available
        for i in range(n):
            yield buf[i * block_size:(i + 1) * block_size + 1]
        carry = buf[n * block_size:]


def batches(chunks: Iterable[np.ndarray], block_size: int, batch_size: int, seed: int,
            shuffle_buffer: int = 256, device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches of windows, shuffled within a buffer of ``shuffle_buffer`` windows by a generator
    seeded with ``seed``. The last partial batch of the stream is dropped (every step sees batch_size)."""
    rng = np.random.default_rng(seed)
    device = torch.device(device)
    buffer: list[np.ndarray] = []

    def emit(rows: list[np.ndarray]):
        arr = torch.from_numpy(np.stack(rows)).to(device, non_blocking=True)  # (B, T + 1)
        return arr[:, :-1], arr[:, 1:]

    pending: list[np.ndarray] = []
    for w in windows(chunks, block_size):
        buffer.append(w)
        if len(buffer) >= max(shuffle_buffer, batch_size):
            # Swap a random buffered window out: a reservoir-style local shuffle.
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            pending.append(buffer.pop())
            if len(pending) == batch_size:
                yield emit(pending)
                pending = []
    rng.shuffle(buffer)
    for w in buffer:
        pending.append(w)
        if len(pending) == batch_size:
            yield emit(pending)
            pending = []
