import math

import pytest
import torch

from raygpt.config import ModelConfig, OptimConfig
from raygpt.model import GPT, KVCache
from raygpt.train import configure_optimizer


def make(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.0)
    cfg.update(kw)
    return GPT(ModelConfig(**cfg)).eval()


def test_overfits_a_single_batch():
    model = make().train()
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    opt = configure_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0), torch.device("cpu"))
    first = None
    for _ in range(300):
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5  # ~ln(50) at init
    assert loss.item() < 0.05


def test_weight_tying_and_gpt2_init():
    model = make(n_layer=4)
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].mlp.c_fc.weight.std().item()
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in model.transformer.h]).std().item()
    assert std == pytest.approx(0.02, rel=0.1)
    assert proj == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.1)
    assert model.transformer.h[0].attn.c_attn.bias.abs().sum() == 0
    untied = make(tie_weights=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight


def test_param_count_and_flops():
    model = make(bias=False)
    C, L, V, T = 32, 2, 50, 16
    per_block = 12 * C * C + 2 * C  # attn 4C^2 + mlp 8C^2 + two LayerNorm weights
    expected = V * C + L * per_block + C  # tied wte/lm_head counted once, ln_f, no wpe
    assert model.num_params() == expected
    assert model.num_params(non_embedding=False) == expected + T * C
    matmul = V * C + L * 12 * C * C  # the weights of matmuls: the (tied) head and the blocks' Linears
    assert model.flops_per_token() == 6 * matmul + 12 * L * C * T


def test_kv_cache_logits_equal_full_recompute():
    model = make()
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2))
    cache = KVCache.empty(model.config, 2, "cpu", torch.float32)
    with torch.no_grad():
        model(idx[:, :5], cache=cache)  # prefill 5
        model(idx[:, 5:9], cache=cache)  # a chunk of 4 at pos 5 (needs the offset causal mask)
        for t in range(9, 16):  # then one at a time
            cached, _ = model(idx[:, t:t + 1], cache=cache)
            full, _ = model(idx[:, :t + 1])
            torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
        # the chunk's last position too, against a recompute of the first 9 tokens
    cache2 = KVCache.empty(model.config, 2, "cpu", torch.float32)
    with torch.no_grad():
        model(idx[:, :5], cache=cache2)
        chunk, _ = model(idx[:, 5:9], cache=cache2)
        torch.testing.assert_close(chunk, model(idx[:, :9])[0], rtol=1e-5, atol=1e-5)
    assert cache.pos == 16
    with pytest.raises(ValueError, match="block_size"):
        model(idx[:, :1], cache=cache)


def test_left_padded_rows_equal_each_row_alone():
    """Prompts of different lengths in one batch (left padding): each row's logits equal those of the row
    alone, at the prefill and at every cached step after it. Filler tokens change nothing."""
    model = make()
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, 50, (n,), generator=g) for n in (3, 7, 5)]
    width, steps = 7, 6
    pad = torch.tensor([width - len(r) for r in rows])
    x = torch.stack([torch.cat([torch.full((int(p),), 49), r]) for p, r in zip(pad, rows)])  # filler: id 49
    nxt = torch.randint(0, 50, (3, steps), generator=g)
    with torch.no_grad():
        cache = KVCache.empty(model.config, 3, "cpu", torch.float32)
        batched = [model(x, cache=cache, pad=pad)[0]] + [model(nxt[:, [t]], cache=cache, pad=pad)[0]
                                                         for t in range(steps)]
        recomputed = model(torch.cat([x, nxt], 1), pad=pad)[0]  # no cache, the whole padded batch at once
        for i, r in enumerate(rows):
            alone = [model(torch.cat([r, nxt[i, :t]])[None])[0] for t in range(steps + 1)]
            for t in range(steps + 1):
                torch.testing.assert_close(batched[t][i], alone[t][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(recomputed, batched[-1], rtol=1e-5, atol=1e-5)
        x[0, 0] = 0  # another filler token: the same logits
        torch.testing.assert_close(model(x, pad=pad)[0], batched[0], rtol=1e-6, atol=1e-6)


def test_logits_are_causal():
    model = make()
    a = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(3))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 50  # change only the future
    la, _ = model(a, torch.zeros_like(a))
    lb, _ = model(b, torch.zeros_like(b))
    torch.testing.assert_close(la[:, :10], lb[:, :10])
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


def test_vocab_size_is_required():
    with pytest.raises(ValueError, match="vocab_size"):
        GPT(ModelConfig())
