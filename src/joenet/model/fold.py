"""Inference form of a trained network: BatchNorms folded into the convolutions before them.

In eval mode a BatchNorm is an affine map per channel, so one that directly follows a conv can be
merged into that conv's weights and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``): the same
function, one pass over the activations fewer. Pre-activation BatchNorms (the first of each
residual branch, the head's) follow an addition, not a conv, and stay.
"""

from __future__ import annotations

import copy
import itertools

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorms(net: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of ``net`` in eval mode with each BatchNorm that directly follows a conv folded.

    Returns:
        The folded copy (``net`` itself is untouched) and the names of the folded BatchNorms.
    """
    folded_net = copy.deepcopy(net).eval()
    folded: list[str] = []
    for name, module in folded_net.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (conv_name, conv), (norm_name, norm) in itertools.pairwise(children):
            if (
                isinstance(conv, nn.Conv2d)
                and type(norm) is nn.BatchNorm2d
                and norm.track_running_stats
                and norm.running_mean is not None
            ):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(module, norm_name, nn.Identity())
                folded.append(f"{name}.{norm_name}" if name else norm_name)
    return folded_net, folded
