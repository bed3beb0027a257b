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
    assert float(out_acc["loss"]) == pytest.approx(float(out_big["loss"]), rel=1e-5)


def test_clipping_reports_the_norm_before_clipping():
    model = make()
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    out = train_step(model, opt, make_scaler(CPU, "fp32"), iter([(x, x)]), 1, 0.0, 1e-3, fp32)
    assert float(out["grad_norm"]) > 1e-3  # the raw norm, not the clipped one
    assert out["lr"] == 0.0 and math.isfinite(float(out["loss"]))


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
        assert float(out[-1]["loss"]) < float(out[0]["loss"])
        assert scaler.is_enabled() == (precision == "fp16")


def test_bf16_only_where_the_gpu_has_it_in_hardware(monkeypatch):
    """precision=auto picks bf16 from compute capability 8.0 (A100 on) and fp16 + GradScaler below (V100,
    T4), where torch.cuda.is_bf16_supported() would say yes for its slow emulation; bf16 asked for there is
    refused. Faked capability: no GPU needed."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # the trap
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    for capability, auto in (((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve_precision("auto", cuda) == auto, capability
        if auto == "fp16":
            with pytest.raises(ValueError, match=r"compute capability 7\.\d\) has no bf16 in hardware"):
                resolve_precision("bf16", cuda)
        else:
            assert resolve_precision("bf16", cuda) == "bf16"


def test_peak_flops_by_exact_device_name():
    from raygpt.train import peak_of

    assert peak_of("NVIDIA H200 NVL", "bf16") == 835e12 and peak_of("NVIDIA H200", "bf16") == 989e12
    assert peak_of("NVIDIA H100 80GB HBM3", "bf16") == 989e12 and peak_of("NVIDIA H100 PCIe", "fp32") == 378e12
    assert peak_of("Tesla V100-PCIE-32GB", "fp16") == 112e12 and peak_of("Tesla V100-SXM2-16GB", "fp16") == 125e12
    assert peak_of("NVIDIA L40S", "bf16") == 362e12 and peak_of("NVIDIA L40", "bf16") == 181e12
    assert peak_of("NVIDIA L4", "bf16") == 121e12 and peak_of("NVIDIA A10G", "bf16") == 70e12
    assert peak_of("NVIDIA A100-SXM4-80GB", "fp32") == 156e12 and peak_of("NVIDIA A10", "bf16") == 125e12
    assert peak_of("Tesla T4", "fp16") == 65e12 and peak_of("NVIDIA GeForce RTX 3060", "bf16") is None


def test_flops_count_matmul_weights_only_tied_or_not():
    """6N counts the weights of matmuls: an untied head adds a matmul's worth (the head), not the lookup table."""
    c = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50)
    tied, untied = GPT(ModelConfig(**c, tie_weights=True)), GPT(ModelConfig(**c, tie_weights=False))
    C, L, V, T = 32, 2, 50, 16
    expected = 6 * (L * 12 * C * C + V * C) + 12 * L * C * T
    assert tied.flops_per_token() == untied.flops_per_token() == expected


def test_a_non_finite_loss_stops_the_run_at_the_next_report_naming_its_step(tmp_path):
    """The loop reads the loss from the device at reports only (no host sync per step), yet a nan loss still
    ends the run within one log interval, with the step it first appeared at."""
    from raygpt.train import TrainState, train_loop
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, "train.log_interval=5", "train.eval_interval=100", "train.checkpoint_interval=100",
                      "train.max_steps=100", "model.vocab_size=50", "model.block_size=16")
    model = make()
    forward, calls = model.forward, []

    def poisoned(x, y=None, **kw):  # the loss turns nan at the third step
        logits, loss = forward(x, y, **kw)
        calls.append(1)
        return logits, (loss * float("nan") if len(calls) == 3 else loss)

    model.forward = poisoned
    x = torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(0))
    reports = []
    with pytest.raises(FloatingPointError, match="non-finite .* at step 3;"):
        train_loop(cfg, model, configure_optimizer(model, OptimConfig(), CPU), make_scaler(CPU, "fp32"),
                   iter(lambda: (x, x), None), lambda: [(x, x)], lambda m, s, c: reports.append(m["step"]),
                   TrainState(), device=CPU, precision="fp32")
    assert reports == [1] and len(calls) == 5  # reported step 1; stopped at step 5's report, before it


def _evaluate_on_rank(rank: int, world: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = make()
    batches = _val_batches()
    result = evaluate(model, iter(batches), 5, fp32, rank=rank, world=world)
    torch.save(result, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def _val_batches():
    g = torch.Generator().manual_seed(3)
    return [(x, torch.roll(x, -1, 1)) for x in (torch.randint(0, 50, (4, 16), generator=g) for _ in range(6))]


def test_eval_shared_out_over_ranks_equals_one_rank(tmp_path):
    """Each of 2 ranks (real processes, gloo) evaluates every other batch; the all-reduced mean equals the
    one-rank eval of the same 5 batches, on both ranks."""
    import torch.multiprocessing as mp

    one = evaluate(make(), iter(_val_batches()), 5, fp32)
    init, out = f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "result")
    mp.spawn(_evaluate_on_rank, args=(2, init, out), nprocs=2, join=True)
    for rank in (0, 1):
        shared = torch.load(f"{out}.{rank}", weights_only=True)
        assert shared["val_loss"] == pytest.approx(one["val_loss"], abs=1e-6)
