"""Model contract: every registered architecture has timm's face, and the feature helpers work for
ours and for timm's own ResNets."""

from __future__ import annotations

import pytest
import timm
import torch

from muse.datasets import get_dataset
from muse.models import (
    MODEL_NAMES,
    class_activation_map,
    classifier_weight,
    embedding_dim,
    features_and_logits,
    pooled_embedding,
    supports_cam,
)

# The lowest resolution each family must handle (the generator synthesises below native size).
LOW_RES = {"digits_cnn": 8, "lenet5": 16, "cifar_resnet": 16, "wrn": 16}


def _low_res(name: str) -> int:
    return next(res for prefix, res in LOW_RES.items() if name.startswith(prefix))


def test_model_names_are_exactly_what_muse_models_registers() -> None:
    """The config accepts MODEL_NAMES without loading timm: the list must not drift from the registry."""
    registered = {name for module in ("small", "cifar_resnet", "wrn") for name in timm.list_models(module=module)}
    assert registered == set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_contract(name: str) -> None:
    torch.manual_seed(0)
    in_chans, native, _ = timm.get_pretrained_cfg(name).input_size
    model = timm.create_model(name, num_classes=7, in_chans=in_chans).eval()
    cfg = model.pretrained_cfg
    assert {"input_size", "mean", "std", "num_classes"} <= cfg.keys()
    assert len(cfg["mean"]) == len(cfg["std"]) == in_chans
    assert model.num_classes == 7
    assert model.get_classifier().out_features == 7
    assert model.get_classifier().in_features == embedding_dim(model)
    assert supports_cam(model) == (not name.startswith("lenet5"))

    with torch.no_grad():
        for res in (native, _low_res(name)):
            x = torch.randn(2, in_chans, res, res)
            logits = model(x)
            assert logits.shape == (2, 7)
            feature_map = model.forward_features(x)
            assert feature_map.ndim == 4 and feature_map.shape[:2] == (2, model.num_features)
            torch.testing.assert_close(model.forward_head(feature_map), logits)
            assert model.forward_head(feature_map, pre_logits=True).shape == (2, embedding_dim(model))
            fmap, flogits = features_and_logits(model, x)
            torch.testing.assert_close(fmap, feature_map)
            torch.testing.assert_close(flogits, logits)
            assert pooled_embedding(model, fmap).shape == (2, embedding_dim(model))

        model.reset_classifier(3)
        assert model.num_classes == 3 and model.get_classifier().out_features == 3
        assert model(torch.randn(2, in_chans, native, native)).shape == (2, 3)



@pytest.mark.parametrize("name", MODEL_NAMES)
def test_timm_feature_extraction(name: str) -> None:
    """`features_only=True` gives one map per stage (`feature_info` matches them, the last is the
    classifier's feature map), and `reset_classifier(0, '')` leaves an unpooled map, as timm users expect."""
    in_chans, native, _ = timm.get_pretrained_cfg(name).input_size
    x = torch.randn(2, in_chans, native, native)
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, in_chans=in_chans).eval()
    torch.manual_seed(0)  # the same weights: the wrapper is built around an identically initialised model
    extractor = timm.create_model(name, features_only=True, in_chans=in_chans).eval()
    with torch.no_grad():
        maps = extractor(x)
        assert [m.shape[1] for m in maps] == extractor.feature_info.channels()
        assert [native // m.shape[-1] for m in maps] == extractor.feature_info.reduction()
        torch.testing.assert_close(maps[-1], model.forward_features(x))

        model.reset_classifier(0, global_pool="")
        unpooled = model(x)
    assert unpooled.shape == (2, embedding_dim(model), *maps[-1].shape[-2:])
    if not name.startswith("lenet5"):  # LeNet-5's hidden fc layer stays in the head, as a 1×1 conv
        torch.testing.assert_close(unpooled, maps[-1])

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_default_cfg_follows_the_dataset_registry(name: str) -> None:
    cfg = timm.get_pretrained_cfg(name)
    spec = get_dataset(cfg.tag)  # registered as <arch>.<dataset>
    assert (cfg.mean, cfg.std, cfg.num_classes) == (spec.mean, spec.std, spec.num_classes)
    assert cfg.input_size == (spec.channels, spec.native_resolution, spec.native_resolution)
    assert timm.create_model(name).pretrained_cfg["mean"] == spec.mean


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_helpers_on_timm_resnet(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    feature_map, logits = features_and_logits(model, x)
    width = model.num_features
    assert feature_map.shape == (2, width, 2, 2)
    torch.testing.assert_close(logits, model(x))
    assert supports_cam(model) and embedding_dim(model) == width
    assert pooled_embedding(model, feature_map).shape == (2, width)
    weight = classifier_weight(model)
    assert weight.shape == (10, width)

    cam = class_activation_map(feature_map, weight, logits.argmax(dim=1))
    assert cam.shape == (2, 2, 2)
    assert cam.min() >= 0 and cam.max() <= 1 + 1e-6


def test_supports_cam_rejects_heads_with_layers_after_pooling() -> None:
    assert not supports_cam(timm.create_model("convnext_atto", num_classes=10))
    assert not supports_cam(timm.create_model("lenet5", num_classes=10))


def test_class_activation_map_by_hand() -> None:
    # Channel maps A0, A1 on a 2×2 grid, shared by two images labelled 0 and 1.
    a0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    a1 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    feature_map = torch.stack([a0, a1]).expand(2, 2, 2, 2).clone().requires_grad_()
    weight = torch.tensor([[1.0, -1.0], [0.5, 0.5], [-1.0, -1.0]])

    cam = class_activation_map(feature_map, weight, torch.tensor([0, 1]))
    # class 0: relu(A0 − A1) = [[1, 0], [0, 2]], peak 2; class 1: (A0 + A1)/2 = [[.5, .5], [.5, 1]], peak 1
    expected = torch.tensor([[[0.5, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 1.0]]])
    torch.testing.assert_close(cam, expected, atol=1e-6, rtol=0)

    cam.sum().backward()
    assert feature_map.grad is not None and torch.isfinite(feature_map.grad).all()

    # Class 2's weights make every location negative: the map is zero, not NaN.
    assert class_activation_map(feature_map, weight, torch.tensor([2, 2])).eq(0).all()


def test_classifier_weight_needs_a_linear_classifier() -> None:
    model = timm.create_model("digits_cnn", num_classes=0)
    with pytest.raises(TypeError, match="not nn.Linear"):
        classifier_weight(model)
