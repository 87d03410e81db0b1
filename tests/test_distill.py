"""Knowledge distillation (h2q/distill.py, train.py --teacher): the loss against a naive reference, the
teacher frozen and untouched, quantized teachers, adapters as students, exact resume, clear errors."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import interrupted_and_resumed, tiny_train_config

from h2q import checkpoint, quant
from h2q.cli import run_main
from h2q.config import PRESETS
from h2q.distill import Distillation, distillation_loss
from h2q.errors import H2QError
from h2q.model import Transformer
from h2q.train import TrainConfig, main, train

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(text_dir, out, **kw):
    return tiny_train_config(text_dir, out, **{**dict(steps=8, block_size=32, eval_every=4, save_every=4, warmup=2), **kw})


@pytest.fixture
def teacher_dir(text_dir, tmp_path):
    """A tiny model trained a few steps: a teacher that is not uniform."""
    folder = tmp_path / "teacher"
    train(tiny_config(text_dir, folder, steps=12, lr=1e-2))
    return folder


def test_loss_matches_a_naive_reference():
    """(1 - a) CE + a T^2 sum_v p_t(v) (log p_t(v) - log p_s(v)), averaged over positions."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(11, (2, 5), generator=g)
    alpha, t = 0.3, 2.5
    p_t = torch.softmax(teacher / t, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    ce = -torch.log_softmax(student, -1).gather(-1, targets[..., None]).mean()
    loss, got_ce, got_kl = distillation_loss(student, teacher, targets, alpha, t)
    torch.testing.assert_close(got_kl, kl)
    torch.testing.assert_close(got_ce, ce)
    torch.testing.assert_close(loss, (1 - alpha) * ce + alpha * kl)


def test_alpha_zero_is_cross_entropy_and_a_perfect_student_has_no_kl():
    g = torch.Generator().manual_seed(1)
    logits, other = torch.randn(3, 4, 7, generator=g), torch.randn(3, 4, 7, generator=g)
    targets = torch.randint(7, (3, 4), generator=g)
    loss, ce, _ = distillation_loss(logits, other, targets, 0.0, 2.0)
    assert torch.equal(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    _, _, kl = distillation_loss(logits, logits.clone(), targets, 1.0, 3.0)
    assert abs(float(kl)) < 1e-6


def test_the_teacher_gets_no_gradient():
    torch.manual_seed(0)
    teacher, student = Transformer(PRESETS["tiny"]).eval().requires_grad_(False), Transformer(PRESETS["tiny"])
    objective = Distillation(teacher, 0.5, 2.0)
    x = torch.randint(256, (2, 16))
    y = torch.randint(256, (2, 16))
    objective(student(x), x, y).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert set(objective.parts()) == {"train_ce", "train_kl"} and objective.parts() == {}  # read once


def test_train_with_a_teacher(text_dir, tmp_path, teacher_dir):
    """The teacher file is untouched, the run logs both terms, and resume is exact."""
    before = (teacher_dir / "model.safetensors").read_bytes()
    flags = dict(teacher=str(teacher_dir), distill_alpha=0.7, distill_temperature=2.0)
    straight = []
    summary = train(tiny_config(text_dir, tmp_path / "a", **flags), on_step=lambda s, loss: straight.append(loss))
    assert (teacher_dir / "model.safetensors").read_bytes() == before
    assert {"train_ce", "train_kl"} <= set(summary["final"])
    assert math.isfinite(summary["final"]["val_bpb"])

    resumed, _ = interrupted_and_resumed(tiny_config(text_dir, tmp_path / "b", **flags),
                                         tiny_config(text_dir, tmp_path / "b", resume=True, **flags), stop_at=4)
    assert resumed == straight
    with pytest.raises(H2QError, match="distill-alpha"):  # the mix shapes the run: not changed on resume
        train(tiny_config(text_dir, tmp_path / "b", resume=True, steps=12, **{**flags, "distill_alpha": 0.2}))


def test_a_distilled_student_is_closer_to_its_teacher(text_dir, tmp_path):
    """alpha 1 and T 1 (the KL to the teacher alone) for as many steps as plain training from the same
    seed: the student's KL to the teacher ends lower. The teacher is an untrained model, whose
    distribution plain training on the text moves away from."""
    torch.manual_seed(5)
    checkpoint.save_model(tmp_path / "teacher", Transformer(PRESETS["tiny"]))
    teacher, _ = checkpoint.load_model(tmp_path / "teacher")
    x = torch.tensor(list(b"the quick brown fox jumps over the lazy dog while agents")).view(2, 28)

    def kl_to_teacher(folder):
        student, _ = checkpoint.load_model(folder)
        with torch.no_grad():
            return float(distillation_loss(student(x), teacher(x), x, 1.0, 1.0)[2])

    train(tiny_config(text_dir, tmp_path / "plain", steps=12, lr=1e-2))
    train(tiny_config(text_dir, tmp_path / "soft", steps=12, lr=1e-2, teacher=str(tmp_path / "teacher"),
                      distill_alpha=1.0, distill_temperature=1.0))
    assert kl_to_teacher(tmp_path / "soft") < 0.5 * kl_to_teacher(tmp_path / "plain")


def test_a_quantized_teacher_and_an_adapter_student(text_dir, tmp_path, teacher_dir):
    teacher, meta = checkpoint.load_model(teacher_dir)
    quant.quantize(teacher, "int8", group_size=32)
    checkpoint.save_quantized(tmp_path / "q8", teacher, meta)
    summary = train(tiny_config(text_dir, tmp_path / "adapter", init_from=str(teacher_dir), lora_rank=4,
                                teacher=str(tmp_path / "q8"), lr=1e-2))
    assert summary["final"]["train_kl"] >= 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()


def test_teacher_errors_are_one_line(text_dir, tmp_path, teacher_dir, capsys):
    with pytest.raises(H2QError, match="no model checkpoint"):
        train(tiny_config(text_dir, tmp_path / "a", teacher=str(tmp_path / "nowhere")))
    with pytest.raises(H2QError, match="context 64, shorter"):
        train(tiny_config(text_dir, tmp_path / "b", preset="mini", block_size=128, teacher=str(teacher_dir)))
    code = run_main(main, ["--teacher", str(tmp_path / "nowhere"), "--preset", "tiny", "--data-dir", str(text_dir),
                           "--data-root", str(tmp_path / "prepared"), "--steps", "1", "--out", str(tmp_path / "c"),
                           "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --teacher")
    with pytest.raises(Exception, match="distill_alpha"):
        TrainConfig(distill_alpha=1.5)
    assert json.loads((teacher_dir / "training_log.json").read_text())["steps"] == 12
