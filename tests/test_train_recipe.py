"""The training recipe's parts: the dtype probe's choice, which parameters Muon steps, the WSD
schedule, a time budget that ends on time (a fake clock), and exact resume with either optimizer."""
import json

import pytest
import torch
from conftest import interrupted_and_resumed
from safetensors.torch import load_file
from test_train import tiny_config

from h2q.config import PRESETS
from h2q.errors import ConfigError
from h2q.model import Transformer
from h2q.optim import Optimizers
from h2q.train import TimeBudget, TrainConfig, choose_dtype, lr_factor, make_optimizer, train

CPU = torch.device("cpu")


def measured(fp32_s: float, bf16_s: float):
    """A probe measurement: every timed step of a dtype takes its given seconds."""
    calls = []

    def step_seconds(dtype):
        calls.append(dtype)
        return bf16_s if dtype == torch.bfloat16 else fp32_s

    return step_seconds, calls


@pytest.mark.parametrize("fp32_s, bf16_s", [(1.0, 1.0), (1.0, 1.2), (1.0, 0.97)])
def test_dtype_probe_keeps_fp32_when_bf16_is_not_faster(fp32_s, bf16_s):
    step_seconds, calls = measured(fp32_s, bf16_s)
    dtype, reason = choose_dtype("auto", CPU, step_seconds)
    assert dtype == torch.float32 and "probe" in reason
    assert calls.count(torch.float32) == calls.count(torch.bfloat16) > 1
    assert calls[2:6] == [torch.float32, torch.bfloat16] * 2  # interleaved after the warm-ups


def test_dtype_probe_picks_bf16_when_faster_and_flag_overrides():
    assert choose_dtype("auto", CPU, measured(1.0, 0.6)[0])[0] == torch.bfloat16
    step_seconds, calls = measured(1.0, 0.6)
    assert choose_dtype("float32", CPU, step_seconds) == (torch.float32, "--dtype float32")
    assert choose_dtype("bfloat16", CPU, step_seconds)[0] == torch.bfloat16
    assert calls == []  # no probe when --dtype is given


def test_muon_gets_exactly_the_hidden_matrices():
    model = Transformer(PRESETS["tiny"])
    params = list(model.named_parameters())
    optimizer = make_optimizer(params, TrainConfig(), CPU)
    assert isinstance(optimizer, Optimizers)
    adamw, muon = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in params}
    muon_names = [names[id(p)] for g in muon.param_groups for p in g["params"]]
    assert muon_names == [f"layers.{i}.{m}.weight" for i in range(2) for m in
                          ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]]
    adamw_names = sorted(names[id(p)] for g in adamw.param_groups for p in g["params"])
    assert adamw_names == sorted(["embed.weight", "norm.weight", *[f"layers.{i}.{n}_norm.weight" for i in range(2)
                                                                   for n in ("attn", "mlp")]])
    assert isinstance(make_optimizer(params, TrainConfig(optimizer="adamw"), CPU), torch.optim.AdamW)
    assert isinstance(make_optimizer(params, TrainConfig(), CPU, adapter=True), torch.optim.AdamW)


def test_wsd_schedule():
    cfg = TrainConfig(decay_frac=0.3, min_lr_frac=0.1)
    assert [lr_factor(s, 0.0, cfg, warmup=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(10, 0.5, cfg, 4) == lr_factor(10, 0.7, cfg, 4) == 1.0
    assert lr_factor(10, 0.85, cfg, 4) == pytest.approx(0.55)
    assert lr_factor(10, 1.0, cfg, 4) == lr_factor(10, 1.5, cfg, 4) == pytest.approx(0.1)
    assert lr_factor(10, 0.99, TrainConfig(decay_frac=0.0), 4) == 1.0


def test_bad_threads_value():
    with pytest.raises(ConfigError, match="threads"):
        TrainConfig(threads="two")
    with pytest.raises(ConfigError, match="threads"):
        TrainConfig(threads="0")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_time_budget_ends_on_time_with_a_fake_clock(text_dir, tmp_path):
    """Each step takes 2 s of a fake clock; a 30 s budget stops within a step and the reserve of its
    end, the final evaluation and save included, with the lr decayed by then."""
    clock, step_s = FakeClock(), 2.0

    def one_step_passes(step, loss):
        clock.now += step_s

    cfg = tiny_config(text_dir, tmp_path / "run", steps=0, time_budget=0.5, eval_every=1, save_every=10**6)
    summary = train(cfg, on_step=one_step_passes, clock=clock, started=0.0)
    assert not summary["interrupted"] and summary["max_steps"] == summary["steps"]
    # evaluations take no fake time; no save has run, so one is reserved at a step's time, plus the
    # exit's allowance: the last step is the 13th, which ends at 26 s with 2 + 2 s kept
    assert 30 - 2 * step_s - TimeBudget.EXIT_S <= clock.now <= 30
    assert summary["steps"] == 13
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records]
    peak = cfg.lr
    assert lrs[:5] == pytest.approx([peak * (s + 1) / 5 for s in range(5)])  # warmup
    assert lrs[-1] < 0.5 * peak and lrs[5:] == sorted(lrs[5:], reverse=True)  # stable, then decayed by the end
    # a resume of the finished budget run trains nothing
    again = train(tiny_config(text_dir, tmp_path / "run", steps=0, time_budget=0.5, eval_every=1, save_every=10**6,
                              resume=True), clock=clock, started=clock.now)
    assert again["steps"] == summary["steps"]


def test_budget_reserves_the_final_evaluation_and_save():
    clock = FakeClock()
    budget = TimeBudget(100.0, started=0.0, clock=clock)
    for _ in range(3):
        clock.now += 5.0
        budget.step_done()
    budget.timed("eval", lambda: setattr(clock, "now", clock.now + 10.0))
    budget.timed("save", lambda: setattr(clock, "now", clock.now + 3.0))
    budget.step_done()  # this iteration's 13 s of evaluation and save are not step time
    assert budget.recent == [5.0, 5.0, 0.0] and budget.step_s() == 5.0
    assert budget.reserve(eval_batches=2) == 13.0 + TimeBudget.EXIT_S
    clock.now = 100 - 5 - 13 - TimeBudget.EXIT_S - 0.5
    assert not budget.out_of_time(2)
    clock.now += 1.0
    assert budget.out_of_time(2)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_resume_is_exact_with_each_optimizer_and_bf16(text_dir, tmp_path, optimizer):
    """12 steps straight == 6, Ctrl-C, --resume, 6 more (bf16 autocast, the dtype kept by the state)."""
    kw = {"steps": 12, "eval_every": 6, "save_every": 6, "optimizer": optimizer, "dtype": "bfloat16"}
    straight = []
    train(tiny_config(text_dir, tmp_path / "a", **kw), on_step=lambda s, loss: straight.append(loss))
    resumed, _ = interrupted_and_resumed(tiny_config(text_dir, tmp_path / "b", **kw),
                                         tiny_config(text_dir, tmp_path / "b", resume=True, **{**kw, "dtype": "auto"}),
                                         stop_at=6)
    assert resumed == straight
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
