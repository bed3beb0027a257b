import numpy as np
import pytest
import torch

from raygpt.data.windows import EpochPlan, epoch_batches, fixed_batches, windows


def test_windows_span_chunk_boundaries_and_cover_every_target():
    chunks = [np.arange(0, 7), np.arange(7, 10), np.arange(10, 23)]
    ws = list(windows(chunks, 4))
    assert [w.tolist() for w in ws] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12], [12, 13, 14, 15, 16],
                                        [16, 17, 18, 19, 20]]


UNITS = [np.arange(i * 1000, i * 1000 + n) for i, n in enumerate([300, 250, 300, 120, 300, 280, 90, 300])]


def run_epoch(plan, epoch, rank, skip=0, buffer=32):
    units = ((int(u), UNITS[u]) for u in plan.units(epoch, rank))
    return list(epoch_batches(units, plan, epoch, rank, skip, buffer))


def test_epoch_plan_deals_every_unit_once_and_reshuffles_each_epoch():
    plan = EpochPlan([len(u) for u in UNITS], block_size=16, batch_size=4, seed=3, world=2)
    e0 = sorted(np.concatenate([plan.units(0, 0), plan.units(0, 1)]).tolist())
    assert e0 == list(range(len(UNITS)))
    assert plan.units(0, 0).tolist() != plan.units(1, 0).tolist() or plan.units(0, 1).tolist() != plan.units(1, 1).tolist()
    for rank in range(2):
        batches = run_epoch(plan, 0, rank)
        assert len(batches) == plan.batches_in_epoch(0, rank) > 0
        x, y = batches[0]
        assert x.shape == (4, 16) and torch.equal(y[:, :-1], x[:, 1:])
        starts = [int(x[i, 0]) for x, _ in batches for i in range(4)]
        assert len(set(starts)) == len(starts)  # each window at most once per epoch
        assert starts != sorted(starts)  # actually shuffled


def test_a_resumed_stream_continues_with_exactly_the_same_batches():
    plan = EpochPlan([len(u) for u in UNITS], block_size=16, batch_size=4, seed=3, world=2)
    n = plan.batches_in_epoch(1, 1)
    full = run_epoch(plan, 1, 1)
    resumed = run_epoch(plan, 1, 1, skip=n // 2)
    assert len(resumed) == n - n // 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[n // 2:], resumed))
    # locate() turns a count of batches into (epoch, batch in epoch): the same place.
    assert plan.locate(1, plan.batches_in_epoch(0, 1) + n // 2) == (1, n // 2)


def test_an_out_of_order_stream_and_a_too_small_split_are_refused():
    plan = EpochPlan([len(u) for u in UNITS], block_size=16, batch_size=4, seed=3, world=1)
    wrong = ((int(u), UNITS[u]) for u in reversed(plan.units(0, 0)))
    with pytest.raises(RuntimeError, match="out of order"):
        list(epoch_batches(wrong, plan, 0, 0))
    tiny = EpochPlan([40, 30], block_size=16, batch_size=8, seed=0, world=2)
    with pytest.raises(ValueError, match="less than one batch"):
        tiny.locate(0, 0)


def test_fixed_val_batches_are_the_same_windows_however_the_stream_is_chunked():
    ids = np.arange(5000)
    a = fixed_batches([ids], len(ids), 16, 4, steps=5, seed=1)
    b = fixed_batches(np.array_split(ids, 7), len(ids), 16, 4, steps=5, seed=1)
    assert len(a) == 5 and all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    starts = [int(x[i, 0]) for x, _ in a for i in range(4)]
    assert all(s % 16 == 0 for s in starts) and max(starts) > 2500  # spread over the stream, not its head
    with pytest.raises(ValueError, match="less than one batch"):
        fixed_batches([ids[:40]], 40, 16, 4, steps=5, seed=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_reach_cuda_through_pinned_memory(monkeypatch):
    from raygpt.data import windows

    pinned = []
    original = torch.Tensor.pin_memory

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        pinned.append(out.is_pinned())
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", spy)
    out = windows.to_device(torch.arange(12).view(3, 4), torch.device("cuda"))
    assert out.is_cuda and pinned == [True] and out.cpu().tolist() == torch.arange(12).view(3, 4).tolist()
