"""Each loss against values computed by hand on tiny tensors."""

import math

import pytest
import timm
import torch
from torch import nn

from muse.config import load_config
from muse.synthesis import applicable_key_region
from muse.losses import (
    BNStatisticsLoss,
    adversarial_loss,
    embedding_distance_loss,
    gaussian_target,
    kd_loss,
    key_region_loss,
    kl_divergence,
)


def test_bn_statistics_loss_matches_hand_computation():
    bn = nn.BatchNorm2d(1).eval()
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(2.0)
    loss = BNStatisticsLoss(nn.Sequential(bn), momentum=0.0)
    x = torch.tensor([0.0, 2.0, 4.0, 6.0]).view(1, 1, 2, 2)  # mean 3, biased variance 5
    loss.start()
    bn(x)
    assert loss.loss().item() == pytest.approx(abs(1 - 3) + abs(2 - 5))


def test_bn_statistics_loss_blends_the_ema_per_key():
    bn = nn.BatchNorm2d(1).eval()  # running mean 0, running var 1
    loss = BNStatisticsLoss(nn.Sequential(bn), momentum=0.5)
    loss.start(key=8)
    bn(torch.full((1, 1, 2, 2), 2.0))  # mean 2, var 0
    loss.update_ema()
    loss.start(key=8)
    bn(torch.full((1, 1, 2, 2), 4.0))  # mean 4 blended with EMA 2 → 3; var 0
    assert loss.loss().item() == pytest.approx(3.0 + 1.0)
    loss.start(key=16)  # another resolution has no EMA yet
    bn(torch.full((1, 1, 2, 2), 4.0))
    assert loss.loss().item() == pytest.approx(4.0 + 1.0)
    loss.update_ema()
    restored = BNStatisticsLoss(nn.Sequential(nn.BatchNorm2d(1)), momentum=0.5)
    restored.load_state_dict(loss.state_dict())
    assert set(restored.ema) == {8, 16}


def test_bn_statistics_loss_sums_over_layers():
    model = nn.Sequential(nn.BatchNorm2d(2), nn.BatchNorm2d(2)).eval()
    loss = BNStatisticsLoss(model, momentum=0.0)
    loss.start()
    model(torch.zeros(1, 2, 1, 1))  # mean 0 (= running), var 0 vs running 1 → ‖(1,1)‖ = √2 per layer
    assert loss.loss().item() == pytest.approx(2 * math.sqrt(2))


def test_kl_and_kd_loss_by_hand():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax (0.75, 0.25)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_divergence(student, teacher).item() == pytest.approx(expected)
    # at τ = 2 the teacher's softmax is (√3, 1)/(√3 + 1)
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    expected_tau = (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)) * 4
    assert kd_loss(student, teacher, tau=2.0).item() == pytest.approx(expected_tau, rel=1e-5)


def test_adversarial_loss_only_counts_agreeing_samples():
    teacher = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    student = torch.tensor([[0.1, 0.0], [0.0, 1.0]])  # first agrees with the teacher, second does not
    kl_first = kl_divergence(student[:1], teacher[:1]).item()
    assert adversarial_loss(student, teacher).item() == pytest.approx(-kl_first / 2)


def test_gaussian_target_is_centred_with_peak_one():
    target = gaussian_target(3, 3, sigma=0.5)
    assert target[1, 1].item() == pytest.approx(1.0)
    assert target[0, 1].item() == pytest.approx(math.exp(-1 / (2 * 1.5**2)))
    assert torch.allclose(target, target.T)


def test_key_region_loss_by_hand():
    feature_map = torch.zeros(1, 1, 3, 3)
    feature_map[0, 0, 1, 1] = 2.0  # evidence only in the centre → CAM = one-hot centre after scaling
    weight = torch.tensor([[1.0], [-1.0]])
    target = gaussian_target(3, 3, sigma=0.25)
    cam = torch.zeros(3, 3)
    cam[1, 1] = 1.0
    expected = ((cam - target) ** 2).mean().item()
    assert key_region_loss(feature_map, weight, torch.tensor([0]), 0.25).item() == pytest.approx(expected, rel=1e-5)
    # for class 1 the CAM is all zero after the ReLU
    assert key_region_loss(feature_map, weight, torch.tensor([1]), 0.25).item() == pytest.approx(
        (target**2).mean().item(), rel=1e-5)


def test_embedding_distance_loss_by_hand():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1])
    # distances² 0 and 2; radius 0.5 → relu(-0.5)=0 and 1.5, mean 0.75
    assert embedding_distance_loss(embeddings, anchors, labels, radius=0.5).item() == pytest.approx(0.75)


@pytest.mark.parametrize("arch, in_chans, overrides, kept", [
    ("digits_cnn", 1, [], True),  # 8×8 map at 16 px
    ("lenet5", 1, ["teacher.arch=lenet5", "student.arch=lenet5_half"], False),  # an MLP head: no CAM
    ("resnet18", 1, ["teacher.arch=resnet18"], False),  # a 1×1 map at 16 px
])
def test_the_key_region_term_is_switched_off_where_the_teacher_has_no_usable_cam(arch, in_chans, overrides, kept, capsys):
    cfg = load_config("digits", ["loss.kr=0.5", *overrides])
    teacher = timm.create_model(arch, num_classes=10, in_chans=in_chans)
    checked = applicable_key_region(cfg, teacher, in_chans, 16)
    assert checked.loss.kr == (0.5 if kept else 0.0)
    assert checked.loss.model_dump(exclude={"kr"}) == cfg.loss.model_dump(exclude={"kr"})
    err = capsys.readouterr().err
    assert ("switched off" in err) == (not kept)
