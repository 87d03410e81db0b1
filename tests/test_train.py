"""train.py end to end: exact resume, clear errors, the air gap, and 2-process data parallelism."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import interrupted_and_resumed, tiny_train_config
from safetensors.torch import load_file

from h2q import checkpoint
from h2q.errors import H2QError
from h2q.train import train

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(text_dir, out, **kw):
    return tiny_train_config(text_dir, out, **kw)


def test_resume_is_exact(text_dir, tmp_path):
    """20 steps straight == 10 steps, Ctrl-C, --resume, 10 more: same losses and same weights."""
    straight = []
    train(tiny_config(text_dir, tmp_path / "a"), on_step=lambda s, loss: straight.append(loss))
    resumed, summary = interrupted_and_resumed(tiny_config(text_dir, tmp_path / "b"),
                                               tiny_config(text_dir, tmp_path / "b", resume=True), stop_at=10)
    assert summary["interrupted"] and summary["steps"] == 10
    assert resumed == straight
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20]
    assert json.loads((tmp_path / "b" / "training_log.json").read_text())["steps"] == 20


def test_empty_data_dir_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(H2QError):
        train(tiny_config(tmp_path / "empty", tmp_path / "out"))


def run_script(args, cwd, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, **kw)


@pytest.mark.slow
def test_cli_bad_input_gives_one_line(tmp_path):
    result = run_script([str(ROOT / "train.py"), "--data-dir", str(tmp_path / "nope"), "--preset", "tiny"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr
    result = run_script([str(ROOT / "train.py"), "--resume", "--out", str(tmp_path / "none"), "--preset", "tiny",
                         "--data-dir", str(tmp_path)], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.mark.slow
def test_train_script_air_gapped(text_dir, tmp_path):
    """The whole entry point runs with every socket connection made to fail."""
    out = tmp_path / "ckpt"
    result = run_script([str(ROOT / "tests" / "airgap.py"), str(ROOT / "train.py"), "--data-dir", str(text_dir),
                         "--data-root", str(tmp_path / "prep"), "--out", str(out), "--preset", "tiny",
                         "--steps", "6", "--eval-every", "3", "--eval-batches", "2", "--batch-size", "4",
                         "--no-progress", "--device", "cpu"], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").exists() and "bits/byte" in result.stdout


@pytest.mark.slow
def test_torchrun_two_processes(text_dir, tmp_path):
    out = tmp_path / "ddp"
    result = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
                         "--data-dir", str(text_dir), "--data-root", str(tmp_path / "prep"), "--out", str(out),
                         "--preset", "tiny", "--steps", "4", "--eval-every", "2", "--eval-batches", "1",
                         "--batch-size", "2", "--no-progress", "--device", "cpu"], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    log = json.loads((out / "training_log.json").read_text())
    assert log["world_size"] == 2 and log["steps"] == 4
    state = load_file(str(out / "train_state.safetensors"))
    assert not torch.equal(state["rng.sampler.0"], state["rng.sampler.1"])  # each rank its own batches


@pytest.mark.slow
def test_lora_finetune_trains_only_the_adapter(text_dir, tmp_path):
    """--init-from BASE --lora-rank R: the base file is untouched, the adapter learns and resumes exactly."""
    base_dir = tmp_path / "base"
    train(tiny_config(text_dir, base_dir, steps=4))
    base_before = (base_dir / "model.safetensors").read_bytes()
    straight = []
    lora_cfg = dict(init_from=str(base_dir), lora_rank=4, lr=1e-2, steps=12, save_every=6, eval_every=6)
    summary = train(tiny_config(text_dir, tmp_path / "a", **lora_cfg), on_step=lambda s, loss: straight.append(loss))
    assert summary["final"]["val_loss"] < 6.0
    assert (base_dir / "model.safetensors").read_bytes() == base_before
    adapter_keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors")).keys()
    assert adapter_keys and all(k.endswith((".lora_A", ".lora_B")) for k in adapter_keys)

    resumed, _ = interrupted_and_resumed(tiny_config(text_dir, tmp_path / "b", **lora_cfg),
                                         tiny_config(text_dir, tmp_path / "b", resume=True, **lora_cfg), stop_at=6)
    assert resumed == straight


def test_peft_style_lora_flags_reach_the_adapter(text_dir, tmp_path):
    """--lora-dropout and --lora-targets (PEFT's lora_dropout and target_modules) shape the adapter
    train.py saves; an unknown linear is one ConfigError naming the flag."""
    from h2q.errors import ConfigError

    train(tiny_config(text_dir, tmp_path / "base", steps=2, eval_every=2, save_every=2))
    samples = [json.loads(line) for line in (tmp_path / "base" / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples] == [2] and isinstance(samples[0]["text"], str)  # the base report's samples
    train(tiny_config(text_dir, tmp_path / "lora", steps=2, eval_every=2, save_every=2,
                      init_from=str(tmp_path / "base"), lora_rank=2, lora_dropout=0.1, lora_targets="q_proj,v_proj"))
    config = json.loads((tmp_path / "lora" / checkpoint.ADAPTER_CONFIG_FILE).read_text())
    assert config["lora_dropout"] == 0.1 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="lora_targets"):
        tiny_config(text_dir, tmp_path / "x", lora_targets="nothing")
