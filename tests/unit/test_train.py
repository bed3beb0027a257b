import contextlib
import math
import time

import pytest
import torch

from raygpt.config import ModelConfig, OptimConfig
from raygpt.model import GPT
from raygpt.train import (TokenBatches, autocast, configure_optimizer, evaluate, lr_at, make_scaler, peak_flops,
                          resolve_precision, train_step)

CPU = torch.device("cpu")
fp32 = contextlib.nullcontext


def make() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50))


def test_lr_warmup_then_cosine_to_min():
    o = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(0, o, 110) == pytest.approx(1e-4)  # first step: lr/warmup, never 0
    assert lr_at(9, o, 110) == pytest.approx(1e-3)
    assert lr_at(60, o, 110) == pytest.approx((1e-3 + 1e-4) / 2)  # halfway through the cosine
    assert lr_at(110, o, 110) == pytest.approx(1e-4)
    assert lr_at(500, o, 110) == pytest.approx(1e-4)  # held at min after decay
    lrs = [lr_at(s, o, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay
    o2 = OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=0, decay_steps=50)
    assert lr_at(50, o2, 1000) == 0.0 and lr_at(25, o2, 1000) == pytest.approx(5e-4)


def test_weight_decay_only_on_matrices():
    model = make()
    opt = configure_optimizer(model, OptimConfig(weight_decay=0.1), CPU)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"transformer.ln_f.weight", "transformer.h.0.attn.c_attn.bias"}
    # every parameter exactly once (the tied matrix included)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def grads_after(model, batches, accum):
    captured = {}

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            captured.update({n: p.grad.clone() for n, p in model.named_parameters()})
            return super().step(closure)

    opt = Spy(model.parameters(), lr=0.0)  # lr 0: the step leaves weights alone, we read the grads
    out = train_step(model, opt, make_scaler(CPU, "fp32"), iter(batches), accum, 0.0, 0.0, fp32)
    return captured, out


def test_grad_accumulation_equals_the_big_batch():
    x = torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)
    g_big, out_big = grads_after(make(), [(x, y)], 1)
    g_acc, out_acc = grads_after(make(), [(x[:4], y[:4]), (x[4:], y[4:])], 2)
    for name in g_big:
        torch.testing.assert_close(g_acc[name], g_big[name], rtol=1e-4, atol=1e-6)
    assert out_acc["loss"] == pytest.approx(out_big["loss"], rel=1e-5)


def test_clipping_reports_the_norm_before_clipping():
    model = make()
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    out = train_step(model, opt, make_scaler(CPU, "fp32"), iter([(x, x)]), 1, 0.0, 1e-3, fp32)
    assert out["grad_norm"] > 1e-3  # the raw norm, not the clipped one
    assert out["lr"] == 0.0 and math.isfinite(out["loss"])


def test_train_step_counts_the_time_spent_waiting_for_batches():
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))

    def slow():  # a data iterator that takes at least 50 ms per batch
        while True:
            time.sleep(0.05)
            yield x, x

    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    out = train_step(model, opt, make_scaler(CPU, "fp32"), slow(), 2, 0.0, 1.0, fp32)
    assert out["data_s"] >= 0.1  # two micro-steps, each waited at least 50 ms
    out = train_step(model, opt, make_scaler(CPU, "fp32"), iter([(x, x)] * 2), 2, 0.0, 1.0, fp32)
    assert out["data_s"] < 0.05  # a ready list costs next() next to nothing


def test_evaluate_mean_loss_and_perplexity():
    model = make()
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    batches = [(x, x), (x, x), (x, x)]
    out = evaluate(model, batches, 2, fp32)
    _, loss = model.eval()(x, x)
    assert out["val_loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert out["val_perplexity"] == pytest.approx(math.exp(out["val_loss"]))
    with pytest.raises(ValueError, match="val split is empty"):
        evaluate(model, [], 2, fp32)


def test_token_batches_are_shifted_windows_and_resumable():
    tokens = torch.arange(1000).numpy()
    b = TokenBatches(tokens, 16, 4, seed=3)
    x, y = next(b)
    assert x.shape == (4, 16) and torch.equal(y, x + 1)
    state = b.state_dict()
    after = [next(b) for _ in range(3)]
    b2 = TokenBatches(tokens, 16, 4, seed=99)
    b2.load_state_dict(state)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(after, [next(b2) for _ in range(3)]))
    with pytest.raises(ValueError, match="too few"):
        TokenBatches(tokens[:10], 16, 4, seed=0)


def test_precision_choice_on_cpu():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", CPU)
    assert peak_flops(CPU, "fp32") is None and peak_flops(CPU, "fp32", 1e12) == 1e12
    model = make()
    x = torch.randint(0, 50, (2, 16))
    with autocast(CPU, "bf16"):
        logits, _ = model(x, x)
    assert logits.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_precision_steps_on_gpu():
    cuda = torch.device("cuda")
    for precision in ("bf16", "fp16"):
        model = make().to(cuda)
        opt = configure_optimizer(model, OptimConfig(), cuda)
        scaler = make_scaler(cuda, precision)
        x = torch.randint(0, 50, (4, 16), device=cuda)
        out = [train_step(model, opt, scaler, iter([(x, x)]), 1, 1e-3, 1.0, lambda: autocast(cuda, precision))
               for _ in range(20)]
        assert out[-1]["loss"] < out[0]["loss"]
        assert scaler.is_enabled() == (precision == "fp16")
