import numpy as np
import torch

from raygpt.data.windows import batches, windows


def test_windows_span_chunk_boundaries_and_cover_every_target():
    chunks = [np.arange(0, 7), np.arange(7, 10), np.arange(10, 23)]
    ws = list(windows(chunks, 4))
    assert [w.tolist() for w in ws] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12], [12, 13, 14, 15, 16],
                                        [16, 17, 18, 19, 20]]


def test_batches_are_shuffled_by_seed_and_complete():
    chunks = [np.arange(i * 100, (i + 1) * 100) for i in range(20)]  # 2000 tokens -> 124 windows of 16+1
    a = list(batches(chunks, 16, 8, seed=1, shuffle_buffer=32))
    b = list(batches(chunks, 16, 8, seed=1, shuffle_buffer=32))
    c = list(batches(chunks, 16, 8, seed=2, shuffle_buffer=32))
    assert len(a) == 124 // 8
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))  # same seed, same order
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))
    x, y = a[0]
    assert x.shape == (8, 16) and torch.equal(y, x + 1)
    starts = sorted(int(x[i, 0]) for x, _ in a for i in range(8))
    assert len(set(starts)) == len(starts) and all(s % 16 == 0 for s in starts)  # each window at most once
    first = [int(x[i, 0]) for x, _ in a[:2] for i in range(8)]
    assert first != sorted(first)  # actually shuffled
