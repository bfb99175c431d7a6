"""What a network costs: parameters and FLOPs per patch (the README's and the report's figures).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per
multiply-accumulate of convolutions and matrix products only: batch norm, activations, additions,
pooling and bilinear interpolation are not counted (a small share of the arithmetic, not of the
memory traffic). The training step is forward + backward of a BCE loss, batch of one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count


def _conv_backward_flop(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    *args: Any,
    **kwargs: Any,
) -> int:
    # torch's own formula (2.13) counts the weight gradient of a grouped conv `groups` times over,
    # which inflates the depthwise bottleneck's backward 128x (cf. pytorch/pytorch PR 183405).
    # Every multiply of the forward conv reappears exactly once in the input gradient and once in
    # the weight gradient, so each requested gradient costs one forward conv.
    transposed, output_mask = args[4], args[7]
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def count_gflops(model: nn.Module, train: bool, shape: tuple[int, ...] = (1, 1, 256, 256)) -> float:
    """GFLOPs of a forward pass, or of forward + BCE + backward with ``train``, for ``shape``.

    The model is left in train mode when ``train`` and in eval mode otherwise.
    """
    x = torch.rand(shape)
    model.train(train)
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        if train:
            logits = model(x)
            F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits)).backward()
        else:
            with torch.no_grad():
                model(x)
    return counter.get_total_flops() / 1e9


def count_parameters(model: nn.Module) -> int:
    """Trainable and frozen parameters of ``model`` (deep supervision's heads included)."""
    return sum(p.numel() for p in model.parameters())
