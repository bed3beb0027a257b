import numpy as np
import pytest
import torch

from raygpt.data.windows import EpochPlan, epoch_batches, fixed_batches, head, windows


def test_windows_span_chunk_boundaries_and_cover_every_target():
    chunks = [np.arange(0, 7), np.arange(7, 10), np.arange(10, 23)]
    ws = list(windows(chunks, 4))
    assert [w.tolist() for w in ws] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12], [12, 13, 14, 15, 16],
                                        [16, 17, 18, 19, 20]]


SIZES = [300, 250, 300, 120, 300, 280, 90, 300]
STREAM = np.arange(sum(SIZES))  # a split's token stream: token i is the number i
UNITS = np.split(STREAM, np.cumsum(SIZES)[:-1])  # its units, in stream order


def with_head(unit, block):
    """A unit's tokens and the head of the next one, as the Ray read stage delivers them."""
    nxt = UNITS[unit + 1][:head(block)] if unit + 1 < len(UNITS) else STREAM[:0]
    return np.concatenate([UNITS[unit], nxt])


def run_epoch(plan, epoch, rank, skip=0, buffer=32):
    units = ((int(u), with_head(int(u), plan.block_size)) for u in plan.units(epoch, rank))
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
    wrong = ((int(u), with_head(int(u), 16)) for u in reversed(plan.units(0, 0)))
    with pytest.raises(RuntimeError, match="out of order"):
        list(epoch_batches(wrong, plan, 0, 0))
    tiny = EpochPlan([40, 30], block_size=16, batch_size=8, seed=0, world=2)
    with pytest.raises(ValueError, match="less than one batch"):
        tiny.locate(0, 0)


def test_an_epochs_windows_cover_the_stream_and_run_on_into_the_next_unit_only():
    """Windows start at each unit's offset and continue into the unit that follows in the stream (never a
    jump to another part of the text); together they cover every token but the stream's very ends."""
    plan = EpochPlan(SIZES, block_size=16, batch_size=4, seed=5, world=1)
    seen = np.zeros(len(STREAM), dtype=bool)
    for x, y in run_epoch(plan, 0, 0):
        rows = torch.cat([x, y[:, -1:]], dim=1).numpy()  # (B, T + 1) windows
        assert (np.diff(rows, axis=1) == 1).all()  # consecutive tokens of the stream
        for row in rows:
            seen[row] = True
    first = plan.order(0)[1][0]
    assert not seen[:first].any()
    # Missed after the first offset: at most the stream's last partial window and the windows of the last
    # partial batch (dropped, wherever the shuffle put them).
    assert (~seen[first:]).sum() <= 16 + 3 * 17
    assert plan.coverage(0) == pytest.approx(seen.sum() / len(STREAM), abs=3 * 17 / len(STREAM))


def test_coverage_at_gpt2_block_size_and_the_epoch_bound():
    """8192-token units (the prepared layout) at block 1024: an epoch's windows hold over 99% of the tokens
    (units cut on their own lost 13%); epochs_for never promises fewer epochs than a walk through them."""
    plan = EpochPlan([8192] * 300 + [5000], block_size=1024, batch_size=4, seed=0, world=2)
    assert plan.coverage(0) > 0.99 and plan.coverage(3) > 0.99
    for rank in range(2):
        for batches in (1, 100, 2000, 5000):
            bound = plan.epochs_for(rank, 0, 0, batches)
            walked = plan.locate(rank, batches - 1)[0] + 1
            assert walked <= bound <= walked + 2, (rank, batches, walked, bound)


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


def test_a_short_run_draws_from_hundreds_of_units_not_the_first_few_dozen():
    """The buffer the Ray path shuffles in holds about 4M tokens of windows: at block 64 the first 100 batches
    of an epoch come from hundreds of the split's units (a 4096-window buffer gave about 40, and a short run
    trained on them lost 0.07 in val loss against random windows: bench/shuffle_buffer.py)."""
    from raygpt.data.windows import shuffle_windows

    sizes = [8192] * 1000
    plan = EpochPlan(sizes, block_size=64, batch_size=12, seed=0, world=1)
    stream = (np.arange(sizes[u] + int(plan.next_head[u])) + 10_000 * u  # each token says its unit
              for u in (int(u) for u in plan.units(0, 0)))
    units = zip((int(u) for u in plan.units(0, 0)), stream)
    drawn = set()
    for i, (x, _) in enumerate(epoch_batches(units, plan, 0, 0, 0, shuffle_windows(64))):
        drawn |= set((x[:, 0] // 10_000).tolist())
        if i == 99:
            break
    assert shuffle_windows(64) == 65536 and shuffle_windows(1024) == 4096 and shuffle_windows(8192) == 1024
    assert len(drawn) > 300, len(drawn)
