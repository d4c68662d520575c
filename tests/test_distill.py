"""Knowledge distillation: DeiT's loss on hand-made logits, a frozen teacher, the two heads, a real run."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from vitlab.models import create_model
from vitlab.train.checkpoint import save_model
from vitlab.train.losses import DistillationLoss


class Fixed(nn.Module):
    """A 'teacher' that answers with given logits, whatever the images."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, x):
        return self.logits


def log_softmax(row):
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


CLS = [[2.0, 0.0, -1.0]]
DIST = [[0.5, 1.5, 0.0]]
TEACHER = [[0.0, 3.0, 1.0]]  # argmax 1
LABEL = [0]


def test_none_soft_hard_on_hand_made_logits():
    cls, dist, y = torch.tensor(CLS), torch.tensor(DIST), torch.tensor(LABEL)
    ce_cls = -log_softmax(CLS[0])[0]
    ce_dist_label = -log_softmax(DIST[0])[0]
    # none: a plain model uses its one head; a distilled one trains both heads on the labels
    assert DistillationLoss("none")(cls, y).item() == pytest.approx(ce_cls, rel=1e-6)
    assert DistillationLoss("none")((cls, dist), y).item() == pytest.approx(0.5 * (ce_cls + ce_dist_label), rel=1e-6)
    # hard: the [DIST] head learns the teacher's argmax (class 1)
    hard = DistillationLoss("hard", alpha=0.5, teacher=Fixed(TEACHER))((cls, dist), y, torch.zeros(1))
    assert hard.item() == pytest.approx(0.5 * ce_cls + 0.5 * -log_softmax(DIST[0])[1], rel=1e-6)
    # soft: tau^2 * KL(teacher || student) at temperature tau
    tau, alpha = 2.0, 0.3
    pt = [math.exp(v) for v in log_softmax([v / tau for v in TEACHER[0]])]
    ls = log_softmax([v / tau for v in DIST[0]])
    kl = sum(p * (math.log(p) - s) for p, s in zip(pt, ls))
    soft = DistillationLoss("soft", alpha=alpha, tau=tau, teacher=Fixed(TEACHER))((cls, dist), y, torch.zeros(1))
    assert soft.item() == pytest.approx((1 - alpha) * ce_cls + alpha * tau * tau * kl, rel=1e-6)


def test_soft_targets_and_label_smoothing_compose():
    cls, dist = torch.tensor(CLS), torch.tensor(DIST)
    mixed = torch.tensor([[0.6, 0.4, 0.0]])  # a Mixup/CutMix target row
    eps = 0.1
    smooth = [0.6 * (1 - eps) + eps / 3, 0.4 * (1 - eps) + eps / 3, eps / 3]
    ce = -sum(t * l for t, l in zip(smooth, log_softmax(CLS[0])))
    loss = DistillationLoss("hard", alpha=0.5, smoothing=eps, teacher=Fixed(TEACHER))((cls, dist), mixed, torch.zeros(1))
    # smoothing and mixing apply to the label term; the teacher's term is its own argmax
    assert loss.item() == pytest.approx(0.5 * ce + 0.5 * -log_softmax(DIST[0])[1], rel=1e-6)


def test_teacher_is_frozen_and_stays_in_eval_mode():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 3))
    crit = DistillationLoss("soft", alpha=0.5, tau=2.0, teacher=teacher)
    crit.train()  # what the engine does every epoch
    assert not teacher.training and all(not m.training for m in teacher.modules())
    running = teacher[3].running_mean.clone()
    student = nn.Linear(12, 3)
    x = torch.randn(4, 3, 2, 2)
    out = student(x.flatten(1))
    loss = crit((out, out), torch.tensor([0, 1, 2, 0]), x)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert student.weight.grad is not None
    assert torch.equal(teacher[3].running_mean, running)  # eval mode: BatchNorm statistics untouched
    # same images, same teacher answer (dropout off)
    assert torch.equal(teacher(x), teacher(x))


def test_distilled_eval_output_is_the_mean_of_the_two_heads():
    model = create_model("deit_mini_distilled_patch4_32").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls, dist = model.forward_head(model.forward_features(x), separate=True)
        assert torch.allclose(model(x), (cls + dist) / 2, atol=1e-6)
    model.train()
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2  # training: both heads, for the loss


def test_distillation_needs_a_teacher_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vitlab.cli", "train", "--model", "deit_mini_distilled_patch4_32",
                        "--distill.kind", "hard", "--epochs", "1", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--distill.teacher" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_distilled_run_on_shapes_with_a_cnn_teacher(tmp_path):
    teacher = create_model("resnet18_cifar", num_classes=6)
    # trained (say) at 48 px with ImageNet's statistics: it is shown the run's 32-px images resized
    save_model(tmp_path / "teacher.safetensors", teacher,
               meta={"img_size": [48, 48], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    r = subprocess.run([sys.executable, "-m", "vitlab.cli", "train", "--model", "deit_mini_distilled_patch4_32",
                        "--data", "shapes", "--data.subset", "256", "--epochs", "1", "--batch-size", "64",
                        "--distill.teacher", str(tmp_path / "teacher.safetensors"), "--distill.kind", "hard",
                        "--run.precision", "fp32", "--out", str(tmp_path), "--run.name", "student"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads((tmp_path / "student" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("test_acc", "test_acc_cls_head", "test_acc_dist_head"):
        assert 0.0 <= row[key] <= 100.0, key
    cfg = (tmp_path / "student" / "config.yaml").read_text()
    assert "kind: hard" in cfg and "teacher.safetensors" in cfg
    assert "resized from 32x32 to 48x48" in r.stdout + r.stderr and "re-normalised" in r.stdout + r.stderr
    assert "no validation split, so the best epoch (model.safetensors) is picked on the test split" in r.stdout
    # eval --split train scores the 256 images this run trained on, not the whole split
    r = subprocess.run([sys.executable, "-m", "vitlab.cli", "eval", "--checkpoint", str(tmp_path / "student"),
                        "--split", "train", "--precision", "fp32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "student" / "eval-train.json").read_text())["n"] == 256
    assert "trained on 256 of this split's images" in r.stderr


def test_a_teacher_that_does_not_fit_the_data_is_one_line_before_the_run_starts(tmp_path):
    from vitlab.errors import UserError
    from vitlab.train.engine import check_teacher

    grey = create_model("vit_mini_patch7_28", num_classes=6).eval()  # 28x28 single-channel images
    with pytest.raises(UserError, match="does not take this run's 3-channel 32x32 images"):
        check_teacher(grey, "grey", 3, (32, 32), 6, torch.device("cpu"))
    three = create_model("resnet18_cifar", num_classes=3).eval()
    with pytest.raises(UserError, match="predicts 3 classes, this run has 6"):
        check_teacher(three, "three", 3, (32, 32), 6, torch.device("cpu"))
    check_teacher(create_model("resnet18_cifar", num_classes=6).eval(), "fits", 3, (32, 32), 6, torch.device("cpu"))
    # from the command line: one line, exit 2, and no run directory left behind
    save_model(tmp_path / "three.safetensors", three)
    r = subprocess.run([sys.executable, "-m", "vitlab.cli", "train", "--model", "deit_mini_distilled_patch4_32",
                        "--data", "shapes", "--data.subset", "256", "--epochs", "1",
                        "--distill.teacher", str(tmp_path / "three.safetensors"), "--distill.kind", "soft",
                        "--out", str(tmp_path / "runs")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "predicts 3 classes" in r.stderr and not (tmp_path / "runs").exists()


class Recorder(nn.Module):
    """A 'teacher' that keeps the images it was given."""

    in_chans = 3

    def forward(self, x):
        self.seen = x.clone()
        return x.mean(dim=(2, 3))


def test_the_teacher_sees_images_at_its_own_size_channels_and_normalisation():
    from vitlab.train.losses import TeacherView

    torch.manual_seed(0)
    raw = torch.rand(2, 1, 8, 8)  # grey images in [0, 1]
    run_mean, run_std = (0.3,), (0.2,)
    t_mean, t_std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
    view = TeacherView(Recorder(), 1, (8, 8), run_mean, run_std, chans=3, size=(16, 16), mean=t_mean, std=t_std)
    assert len(view.changes) == 3, view.changes
    view((raw - 0.3) / 0.2)
    # by hand: the raw grey image on three channels, normalised the teacher's way, then resized
    rgb = raw.repeat(1, 3, 1, 1)
    want = (rgb - torch.tensor(t_mean).view(1, 3, 1, 1)) / torch.tensor(t_std).view(1, 3, 1, 1)
    want = torch.nn.functional.interpolate(want, size=(16, 16), mode="bilinear", align_corners=False)
    assert view.teacher.seen.shape == (2, 3, 16, 16)
    torch.testing.assert_close(view.teacher.seen, want, atol=1e-5, rtol=1e-5)
    # a teacher trained on images like the run's gets them untouched
    same = TeacherView(Recorder(), 3, (8, 8), t_mean, t_std, chans=3, size=(8, 8), mean=t_mean, std=t_std)
    x = torch.randn(2, 3, 8, 8)
    same(x)
    assert same.changes == [] and torch.equal(same.teacher.seen, x)
    # a size recorded as one number, and the log's steps in the order they are applied
    square = TeacherView(Recorder(), 1, (8, 8), run_mean, run_std, chans=3, size=12, mean=t_mean, std=t_std)
    assert square.size == (12, 12) and square.changes[0].startswith("grey") and square.changes[-1].startswith("resized")
