import pytest
import torch

from covid_lightning.models.classifier import REGIMES, XRayNet, count_parameters

# The Keras lab's model.summary() figures.
LAB_TRAINABLE = {"head": 1_838_596, "last_conv": 2_045_956, "last_2_conv": 2_123_076}


@pytest.fixture(scope="module")
def nets():
    return {r: XRayNet(trainable=r) for r in REGIMES}


def test_backbone_and_head_counts(nets):
    net = nets["head"]
    backbone = count_parameters(net.backbone)
    assert backbone.trainable + backbone.frozen == 687_680
    assert backbone.bn_stats == 18_544
    assert backbone.total == 706_224
    assert count_parameters(net.head).total == 1_838_596
    assert count_parameters(net).total == 2_544_820


@pytest.mark.parametrize("regime", list(LAB_TRAINABLE))
def test_trainable_counts_per_regime(nets, regime):
    counts = count_parameters(nets[regime])
    assert counts.trainable == LAB_TRAINABLE[regime]
    assert counts.total == 2_544_820


def test_last_4_blocks_trains_the_7x7_stage(nets):
    net = nets["last_4_blocks"]
    stage = [net.backbone.blocks[5], net.backbone.blocks[6], net.backbone.conv_head, net.backbone.bn2]
    expected = 1_838_596 + sum(p.numel() for m in stage for p in m.parameters())
    assert count_parameters(net).trainable == expected
    assert not any(p.requires_grad for p in net.backbone.blocks[4].parameters())


def test_all_regime_trains_everything(nets):
    assert count_parameters(nets["all"]).frozen == 0


def test_unknown_regime_lists_valid_names():
    with pytest.raises(ValueError, match="head, last_conv, last_2_conv, last_4_blocks, all"):
        XRayNet(trainable="everything")


def test_regime_needs_mobilenet_layers():
    with pytest.raises(ValueError, match="Conv_1"):
        XRayNet(backbone="resnet18", trainable="last_conv")


def _bn_stats(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k}


@pytest.mark.parametrize("regime", ["head", "last_2_conv"])
def test_frozen_bn_stats_do_not_move_and_trainable_layers_do(regime):
    torch.manual_seed(0)
    net = XRayNet(trainable=regime)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    loss = torch.nn.functional.cross_entropy(net(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    after = net.state_dict()
    trained = (
        {"backbone.blocks.6.0.conv_pwl", "backbone.blocks.6.0.bn3", "backbone.conv_head", "backbone.bn2"}
        if regime != "head"
        else set()
    )
    for key, value in before.items():
        if key.endswith("num_batches_tracked"):
            continue
        changed = not torch.equal(value, after[key])
        layer = key.rsplit(".", 1)[0]
        if key.startswith("head."):
            assert changed, key
        elif key.startswith("backbone."):
            if layer in trained and ("running_" in key or key.endswith(("weight", "bias"))):
                assert changed, f"{key} should train in regime {regime}"
            elif layer not in trained:
                assert not changed, f"{key} moved although frozen in regime {regime}"


def test_frozen_bn_in_eval_mode_after_train_call():
    net = XRayNet(trainable="last_conv")
    net.train()
    assert not net.backbone.bn1.training  # frozen stem BN
    assert net.backbone.bn2.training  # Conv_1_bn trains
    net.eval()
    assert not net.backbone.bn2.training


def test_normalization_choices():
    assert XRayNet(normalization="unit").mean == [0.0, 0.0, 0.0]
    keras = XRayNet(flavor="keras")
    assert keras.normalization == "keras" and keras.mean == [0.5] * 3 and keras.std == [0.5] * 3
    assert XRayNet().normalization == "imagenet"
    with pytest.raises(ValueError, match="unit"):
        XRayNet(normalization="zscore")


def test_keras_flavor_changes_backbone():
    net = XRayNet(flavor="keras")
    assert net.backbone.bn1.eps == pytest.approx(1e-3)
    assert XRayNet().backbone.bn1.eps == pytest.approx(1e-5)


def test_uint8_and_float_inputs_agree():
    net = XRayNet().eval()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(net(x), net(x.float() / 255), rtol=1e-5, atol=1e-5)
