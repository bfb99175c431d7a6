"""Tests for joenet.model: shapes, gradients, argument checks and the receptive field."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from joenet.model import UNet2d, receptive_field
from joenet.model.attention import CBAM, SqueezeExcite
from joenet.model.blocks import (
    ConvNeXtBlock,
    Down,
    PostActBlock,
    PreActResBlock,
    Up,
    make_activation,
    make_conv3x3,
)
from joenet.model.receptive_field import _input_support

TINY = (4, 8, 16, 32)

VARIANTS = [
    {"down": down, "up": up, "activation": act}
    for down, up, act in itertools.product(
        ["strided", "maxpool"], ["transposed", "bilinear"], ["gelu", "leaky_relu"]
    )
] + [
    {"blocks_per_level": 2},
    {"bottleneck_blocks": 2},
    {"bottleneck_kernel_size": 5},
    {"bottleneck_kernel_size": 7, "blocks_per_level": 2, "bottleneck_blocks": 2, "down": "maxpool"},
    {"dropout": 0.1},
    {"norm": "instance"},
    {"input_norm": False},
    {"norm": "group", "down": "maxpool", "up": "bilinear"},
]


def _variant_id(kwargs: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in kwargs.items())


@pytest.mark.parametrize("kwargs", VARIANTS, ids=_variant_id)
def test_output_shape(kwargs: dict) -> None:
    model = UNet2d(channels=TINY, **kwargs)
    x = torch.rand(2, 1, 32, 48)  # non-square on purpose
    assert model(x).shape == (2, 2, 32, 48)


def test_output_shape_other_depths_and_channels() -> None:
    model = UNet2d(in_channels=3, out_channels=5, channels=(4, 8, 16))
    assert model.divisor == 4
    assert model(torch.rand(1, 3, 12, 20)).shape == (1, 5, 12, 20)


@pytest.mark.parametrize("kwargs", VARIANTS, ids=_variant_id)
def test_every_parameter_gets_a_gradient(kwargs: dict) -> None:
    torch.manual_seed(0)
    model = UNet2d(channels=TINY, **kwargs)
    x = torch.rand(2, 1, 32, 32)
    target = (torch.rand(2, 2, 32, 32) > 0.5).float()
    # BCE rather than logits.sum(): the sum of a training-mode BN output does not depend on its
    # input, which could hide a disconnected parameter behind a legitimately zero gradient.
    F.binary_cross_entropy_with_logits(model(x), target).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"No gradient for {name}"
        assert torch.isfinite(param.grad).all(), f"Non-finite gradient for {name}"
        assert param.grad.abs().sum() > 0, f"All-zero gradient for {name}"


def test_default_parameter_count() -> None:
    # Measured, not derived: 1,427,940 for channels (32, 64, 128, 256) with strided downsampling
    # and transposed upsampling. Far below the seed's "~10-20M" estimate: one block per level and a
    # depthwise bottleneck are cheap. A change here means the architecture changed.
    model = UNet2d()
    assert sum(p.numel() for p in model.parameters()) == 1_427_940


@pytest.mark.parametrize(("height", "width"), [(250, 256), (256, 252), (12, 16)])
def test_indivisible_input_raises(height: int, width: int) -> None:
    model = UNet2d(channels=TINY)
    with pytest.raises(ValueError, match="divisible by 8") as err:
        model(torch.rand(1, 1, height, width))
    assert f"{height}x{width}" in str(err.value)
    assert "crop or pad" in str(err.value)


def test_indivisible_input_message_for_default_depth() -> None:
    # 4 levels = 3 downsamplings (256 -> 128 -> 64 -> 32 in the seed), so the divisor is 8.
    with pytest.raises(ValueError, match=r"divisible by 8, got 250x256: crop or pad"):
        UNet2d()(torch.rand(1, 1, 250, 256))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"channels": (32,)},
        {"channels": ()},
        {"channels": (0, 8)},
        {"in_channels": 0},
        {"out_channels": 0},
        {"blocks_per_level": 0},
        {"bottleneck_blocks": 0},
        {"bottleneck_kernel_size": 6},
        {"bottleneck_kernel_size": 0},
        {"activation": "relu"},
        {"down": "avgpool"},
        {"up": "nearest"},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"norm": "layer"},
    ],
    ids=_variant_id,
)
def test_bad_constructor_args_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        UNet2d(**kwargs)


def test_without_input_norm_the_first_conv_sees_the_raw_image() -> None:
    torch.manual_seed(0)
    net = UNet2d(channels=TINY, input_norm=False).train()
    block = net.encoder[0][0]
    x = torch.rand(2, 1, 16, 16) * 10 - 5  # negative values too: GELU would have clipped them
    conv = block.residual[2]
    torch.testing.assert_close(block.residual[:3](x), F.conv2d(x, conv.weight, padding=1))
    with_norm = UNet2d(channels=TINY).encoder[0][0]
    assert isinstance(with_norm.residual[0], nn.BatchNorm2d)
    # Only the first block changes: the rest of the state dict keeps its keys.
    keys = set(UNet2d(channels=TINY).state_dict()) - set(net.state_dict())
    assert keys and all(k.startswith("encoder.0.0.residual.0.") for k in keys)


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_per_sample_norms_do_not_mix_the_batch(norm: str) -> None:
    # Unlike BatchNorm, a sample's output in training mode does not depend on its batch mates.
    torch.manual_seed(0)
    net = UNet2d(channels=(8, 16, 32, 64), norm=norm).train()
    x = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(net(x)[:1], net(x[:1]), atol=1e-5, rtol=1e-4)
    batch_norm = UNet2d(channels=(8, 16, 32, 64)).train()
    assert not torch.allclose(batch_norm(x)[:1], batch_norm(x[:1]), atol=1e-3)


def test_blocks() -> None:
    x = torch.rand(2, 4, 16, 16)
    assert PreActResBlock(4, 8, "leaky_relu")(x).shape == (2, 8, 16, 16)
    assert isinstance(PreActResBlock(4, 4).shortcut, nn.Identity)
    assert ConvNeXtBlock(4, 8, kernel_size=5)(x).shape == (2, 8, 16, 16)
    with pytest.raises(ValueError, match="odd"):
        ConvNeXtBlock(4, 4, kernel_size=6)
    strided, pool = Down(4, 8, "strided"), Down(4, 8, "maxpool")
    assert (strided.out_channels, pool.out_channels) == (8, 4)
    assert strided(x).shape == (2, 8, 8, 8)
    assert pool(x).shape == (2, 4, 8, 8)
    assert Up(4, 2, "transposed")(x).shape == (2, 2, 32, 32)
    assert Up(4, 2, "bilinear")(x).shape == (2, 2, 32, 32)
    with pytest.raises(ValueError, match="down must be one of"):
        Down(4, 8, "avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="activation must be one of"):
        make_activation("relu")  # type: ignore[arg-type]


def test_receptive_field_default_value() -> None:
    # By hand, along one axis, for the worst output position p = 2 (mod 8), walking backwards
    # from the output pixel (inclusive index intervals):
    #   decoder level 0: two 3x3 convs [2, 2] -> [0, 4]; transposed up (j -> j // 2) -> [0, 2]
    #   decoder level 1: [-2, 4] -> [-1, 2];  decoder level 2: [-3, 4] -> [-2, 2] (5 px)
    #   bottleneck 7x7 depthwise: [-5, 5] (11 px at 1/8 resolution)
    #   each encoder level: 2x2 stride-2 window then two 3x3 convs, width w -> 2 * w + 4:
    #   11 -> 26 -> 56 -> 116.
    # Positions 0, 1 give [-54, 53] (108 px); the maximum over the 8 phases is 116.
    assert receptive_field() == 116
    assert UNet2d().receptive_field() == 116
    assert receptive_field(down="maxpool") == 116  # same 2x2 support as the strided conv
    assert receptive_field(up="bilinear") == 140
    assert receptive_field(blocks_per_level=2) == 168
    assert receptive_field(num_levels=5) == 236
    with pytest.raises(ValueError):
        receptive_field(num_levels=1)


def _positive_init(model: nn.Module) -> None:
    # Positive weights and inputs keep every activation positive, so all GELU slopes are > 0
    # and no two paths can cancel: every pixel that can reach the output gets a nonzero gradient.
    # Dividing by sqrt(fan-in) keeps activations and gradients well inside float32's range
    # (measured 1e-19 .. 1e16 for the largest case below); float64 convs are ~20x slower on CPU.
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(0.1, 1.0)
            if param.dim() > 1:
                param /= param[0].numel() ** 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"down": "strided", "up": "transposed"},
        {"down": "maxpool", "up": "transposed", "bottleneck_kernel_size": 3},
        {"down": "strided", "up": "bilinear"},
        {
            "down": "maxpool",
            "up": "bilinear",
            "blocks_per_level": 2,
            "bottleneck_blocks": 2,
            "bottleneck_kernel_size": 5,
        },
        {"channels": (4, 8, 16), "up": "bilinear"},
    ],
    ids=_variant_id,
)
def test_receptive_field_matches_gradient_support(kwargs: dict) -> None:
    torch.manual_seed(0)
    kwargs = {"channels": TINY, **kwargs}
    model = UNet2d(**kwargs).eval()  # eval: BN is a fixed affine map, samples independent
    _positive_init(model)
    for module in model.modules():
        # Max pool routes the gradient to the argmax only, hiding the other 3 pixels it depends
        # on; an average pool has the same 2x2 support and passes gradient to all of them.
        if isinstance(module, Down) and isinstance(module.op, nn.MaxPool2d):
            module.op = nn.AvgPool2d(2)

    # One output pixel per batch sample, covering every phase modulo the downsampling factor,
    # because the support of a U-Net output depends on the position's phase.
    # The input only needs to hold the support with a margin; bigger costs time for nothing.
    phases = model.divisor
    size = (model.receptive_field() // phases + 2) * phases
    positions = [size // 2 - phases // 2 + t for t in range(phases)]
    x = torch.rand(phases, 1, size, size, requires_grad=True)
    out = model(x)
    out[torch.arange(phases), 0, positions, positions].sum().backward()
    # Guard against a false failure: an edge contribution underflowing to 0 would shrink the
    # measured support. Zeros outside the support are structural, so the test cannot pass falsely.
    reached_grads = x.grad[x.grad != 0]
    assert reached_grads.min() > 1e-30 and torch.isfinite(x.grad).all()

    rf_config = model._rf_config
    widths = []
    for t, pos in enumerate(positions):
        reached = x.grad[t, 0] != 0
        rows = reached.any(dim=1).nonzero().flatten()
        cols = reached.any(dim=0).nonzero().flatten()
        expected = _input_support(
            pos,
            num_levels=rf_config["num_levels"],
            blocks_per_level=rf_config["blocks_per_level"],
            bottleneck_kernel_size=rf_config["bottleneck_kernel_size"],
            bottleneck_blocks=rf_config["bottleneck_blocks"],
            up=rf_config["up"],
        )
        assert expected[0] > 0 and expected[1] < size - 1, "input too small: border clips support"
        assert (rows.min().item(), rows.max().item()) == expected
        assert (cols.min().item(), cols.max().item()) == expected
        widths.append(expected[1] - expected[0] + 1)
    assert max(widths) == model.receptive_field()


def test_post_activation_blocks() -> None:
    torch.manual_seed(0)
    net = UNet2d(channels=(8, 16, 32, 64), input_norm=False, block="postact")
    blocks = [m for m in net.modules() if isinstance(m, PostActBlock)]
    assert len(blocks) == 6  # 3 encoder + 3 decoder levels; the bottleneck stays ConvNeXt
    assert not any(isinstance(m, PreActResBlock) for m in net.modules())
    assert isinstance(net.head[0], nn.Identity) and isinstance(net.head[2], nn.Conv2d)
    x = torch.rand(2, 1, 32, 32)
    out = net(x)
    assert out.shape == (2, 2, 32, 32)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    # Same convs, no shortcuts and no pre-activation norms: fewer parameters than preact.
    preact = UNet2d(channels=(8, 16, 32, 64), input_norm=False)
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in preact.parameters())
    assert net.receptive_field() == preact.receptive_field()
    block = PostActBlock(4, 8, "leaky_relu", "instance")
    assert block(torch.rand(2, 4, 16, 16)).shape == (2, 8, 16, 16)
    with pytest.raises(ValueError, match="input_norm=true needs block=preact"):
        UNet2d(block="postact", input_norm=True)
    with pytest.raises(ValueError, match="block must be one of"):
        UNet2d(block="dense", input_norm=False)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "module"),
    [({"attention": "se"}, SqueezeExcite), ({"attention": "cbam"}, CBAM)],
)
def test_attention_options(options: dict, module: type) -> None:
    torch.manual_seed(0)
    net = UNet2d(channels=(8, 16, 32, 64), input_norm=False, **options)
    plain = UNet2d(channels=(8, 16, 32, 64), input_norm=False)
    assert sum(isinstance(m, module) for m in net.modules()) == 6  # every encoder/decoder block
    attention = [m for m in net.modules() if isinstance(m, module)]
    extra = sum(p.numel() for m in attention for p in m.parameters())
    assert extra > 0
    assert (
        sum(p.numel() for p in net.parameters())
        == sum(p.numel() for p in plain.parameters()) + extra
    )
    x = torch.rand(2, 1, 32, 32)
    out = net(x)
    assert out.shape == (2, 2, 32, 32)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert net.receptive_field() == plain.receptive_field()
    # A gate in (0, 1) rescales: SE keeps the sign of every input and shrinks it.
    y = torch.randn(2, 8, 6, 6)
    gated = SqueezeExcite(8)(y)
    assert torch.all(gated.abs() <= y.abs()) and torch.all(gated * y >= 0)
    with pytest.raises(ValueError, match="attention must be one of"):
        UNet2d(attention="transformer")  # type: ignore[arg-type]


def test_depthwise_separable_convolutions() -> None:
    net = UNet2d(channels=(8, 16, 32, 64), input_norm=False, conv="depthwise_separable")
    plain = UNet2d(channels=(8, 16, 32, 64), input_norm=False)
    depthwise = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) >= 12  # two per block, six blocks (plus the bottleneck's own)
    assert sum(p.numel() for p in net.parameters()) < 0.6 * sum(
        p.numel() for p in plain.parameters()
    )
    # Per conv: 9 C_in + C_in C_out weights instead of 9 C_in C_out.
    conv = make_conv3x3(16, 32, "depthwise_separable")
    assert sum(p.numel() for p in conv.parameters()) == 9 * 16 + 16 * 32
    out = net(torch.rand(2, 1, 32, 32))
    out.mean().backward()
    assert out.shape == (2, 2, 32, 32)
    assert all(p.grad is not None for p in net.parameters())
    assert net.receptive_field() == plain.receptive_field()
    zero = UNet2d(channels=(8, 16, 32, 64), conv="depthwise_separable", zero_init_residual=True)
    block = zero.encoder[1][0]
    assert not block.residual[-1][-1].weight.any()  # the pointwise conv ends the branch


def test_deep_supervision_heads_train_and_stay_out_of_inference() -> None:
    torch.manual_seed(0)
    net = UNet2d(channels=(8, 16, 32, 64), input_norm=False, deep_supervision=2)
    x = torch.rand(2, 1, 32, 32)
    logits, aux = net.forward_with_aux(x)
    assert logits.shape == (2, 2, 32, 32)
    assert [a.shape for a in aux] == [(2, 2, 16, 16), (2, 2, 8, 8)]
    torch.testing.assert_close(net(x), logits)  # forward: the full-resolution head only
    assert net.forward_with_aux(x, aux=False)[1] == []
    (logits.mean() + sum(a.mean() for a in aux)).backward()
    assert all(p.grad is not None for p in net.aux_heads.parameters())
    plain = UNet2d(channels=(8, 16, 32, 64), input_norm=False)
    heads = sum(p.numel() for p in net.aux_heads.parameters())
    assert heads == (16 * 2 + 2) + (32 * 2 + 2) + 2 * (16 + 32)  # conv + BatchNorm per head
    assert (
        sum(p.numel() for p in net.parameters())
        == sum(p.numel() for p in plain.parameters()) + heads
    )
    with pytest.raises(ValueError, match=r"deep_supervision must be in \[0, 2\]"):
        UNet2d(channels=(8, 16, 32, 64), deep_supervision=3)


def test_deep_supervision_loss_weights_and_targets() -> None:
    from joenet.losses import BCEDiceLoss, deep_supervision_loss

    criterion = BCEDiceLoss()
    target = torch.zeros(1, 1, 8, 8)
    target[..., :4, :4] = 1
    valid = torch.ones(1, 1, 8, 8)
    valid[..., 0, 0] = 0
    batch = {"target": target, "valid": valid, "labelled": torch.ones(1, 1, dtype=torch.bool)}
    perfect = [torch.full((1, 1, 4, 4), -20.0), torch.full((1, 1, 2, 2), -20.0)]
    perfect[0][..., :2, :2] = 20.0
    perfect[1][..., :1, :1] = 20.0
    main = torch.tensor(0.7)
    # Perfect auxiliary heads add (almost) nothing: the total is the main loss x 4/7.
    total = deep_supervision_loss(criterion, main, perfect, batch)
    torch.testing.assert_close(total, main * 4 / 7, atol=1e-3, rtol=0)
    wrong = [-p for p in perfect]
    assert deep_supervision_loss(criterion, main, wrong, batch) > total + 0.5


def test_fold_batchnorms_keeps_the_function() -> None:
    from joenet.model.fold import fold_batchnorms

    torch.manual_seed(0)
    for options in ({}, {"block": "postact"}, {"conv": "depthwise_separable"}):
        net = UNet2d(channels=(8, 16, 32, 64), input_norm=False, **options)
        net.train()
        for _ in range(3):  # running statistics other than the initial 0 / 1
            net(torch.rand(4, 1, 32, 32) * 2)
        net.eval()
        folded, names = fold_batchnorms(net)
        x = torch.rand(2, 1, 48, 32)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)
        remaining = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        before = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        assert remaining == before - len(names) and names
        assert net.encoder[1][0] is not folded.encoder[1][0]  # the original is untouched
        if options.get("block") == "postact":  # conv-norm-act twice: both norms of each block
            assert {"encoder.1.0.body.1", "encoder.1.0.body.4"} <= set(names)
            assert remaining == 1  # only the bottleneck's pre-activation norm stays
    # Pre-activation: the second norm of each branch follows a conv; the first (after the
    # addition of the previous block) and the head's stay.
    net = UNet2d(channels=(8, 16, 32, 64), input_norm=False).eval()
    _, names = fold_batchnorms(net)
    assert "encoder.1.0.residual.3" in names and "encoder.1.0.residual.0" not in names
    assert "bottleneck.0.residual.3" in names and not any(n.startswith("head") for n in names)
