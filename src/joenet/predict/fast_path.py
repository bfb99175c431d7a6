"""The network as prediction runs it: folded BatchNorms, channels_last, and torch.compile.

Measured on this project's 2-core AVX2 CPU, batch 1, 256 px tiles, fp32 (``python
benchmarks/fold_bench.py``, docs/fold_bench.md): folding 1.03-1.10x, channels_last another 1.13x
(oneDNN's blocked convolutions skip the layout reorders NCHW needs), ``torch.compile`` with
freezing 1.54x over eager in all (weights become constants, so inductor pre-packs them and fuses
the pointwise ops into the convolutions). Compiling costs ~20 s per process (less with a warm
inductor cache in ``/tmp/torchinductor_<user>``), so ``compile="auto"`` compiles on a CPU only
when the run has enough tiles to pay it back several times over. On GPUs nothing has been
measured yet, so ``auto`` leaves them eager.

All of these compute the same function up to float rounding (logits within 1e-4, tested), so
none is part of an output's resume fingerprint.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from joenet.model.fold import fold_batchnorms
from joenet.predict.tiling import per_sample_norm

log = logging.getLogger(__name__)

# Compiled saves ~33-35 ms per tile against eager channels_last on a CPU (predict_bench,
# fold_bench): 1,000 tiles (40 slices of 1024 x 1024) save ~35 s against a ~22 s cold compile
# (less with a warm inductor cache); it breaks even near 650 tiles, and loses below.
CPU_COMPILE_MIN_TILES = 1000
_COMPILE_WORDS: dict[str, bool | str] = {"true": True, "false": False, "auto": "auto"}


def check_switch(value: bool | str, key: str) -> bool | str:
    """``value`` as True, False or ``"auto"``; a ``ValueError`` naming ``key`` otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _COMPILE_WORDS:
        return _COMPILE_WORDS[value.lower()]
    raise ValueError(f"{key} must be true, false or auto, got {value!r}")


def check_compile(compile: bool | str) -> bool | str:
    """``compile`` as True, False or ``"auto"``; a ``ValueError`` naming the key otherwise."""
    return check_switch(compile, "compile")


def resolve_channels_last(channels_last: bool | str, net: nn.Module, device: torch.device) -> bool:
    """Whether to run ``net`` in channels_last on ``device``.

    ``auto``: channels_last, except for networks with per-sample norms (InstanceNorm, GroupNorm,
    the default since) on a CPU: there it measured 0.91x per tile against 1.13x for BatchNorm
    networks (``benchmarks/fold_bench.py``, docs/benchmarks.md); on CUDA it is what bf16 tensor
    cores want (unmeasured here).
    """
    channels_last = check_switch(channels_last, "channels_last")
    if channels_last != "auto":
        return bool(channels_last)
    return device.type != "cpu" or not per_sample_norm(net)


def resolve_compile(compile: bool | str, device: torch.device, tiles: int) -> bool:
    """Whether to compile a prediction of ``tiles`` forward passes on ``device``."""
    compile = check_compile(compile)
    if compile != "auto":
        return bool(compile)
    return device.type == "cpu" and tiles >= CPU_COMPILE_MIN_TILES


class FixedShapeCompiled(nn.Module):
    """``torch.compile`` of a network for one input shape, eager for any other.

    Prediction sends tiles of one shape (a partial last batch is padded to it), so one
    compilation serves the whole run; an odd shape (a volume smaller than a tile) runs eager
    instead of paying a recompile.
    """

    def __init__(self, net: nn.Module, shape: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.net = net
        self.shape = shape
        # Freezing folds the weights into the graph as constants: inference only, which is
        # all prediction does (``forward_tiles`` runs under inference_mode).
        self.compiled: Callable[[Tensor], Tensor] | None = torch.compile(
            net, dynamic=False, options={"freezing": True}
        )
        self._compiled_once = False

    def forward(self, x: Tensor) -> Tensor:
        if self.compiled is None or x.shape[1:] != self.shape[1:] or x.shape[0] > self.shape[0]:
            return self.net(x)
        batch = x.shape[0]
        if batch < self.shape[0]:  # pad the last batch rather than compile a second shape
            x = torch.cat([x, x.new_zeros((self.shape[0] - batch, *x.shape[1:]))])
        try:
            out = self.compiled(x)[:batch]
        except Exception as err:
            if self._compiled_once:  # a later failure is not the compiler's: let it be seen
                raise
            # The first call compiles: inductor needs a C++ compiler, which may be missing.
            first_line = str(err).splitlines()[0][:200] if str(err) else ""
            log.warning(
                "torch.compile failed (%s: %s); predicting without it (compile=false skips it)",
                type(err).__name__,
                first_line,
            )
            self.compiled = None
            return self.net(x[:batch])
        self._compiled_once = True
        return out


def inference_network(
    net: nn.Module,
    *,
    fold: bool = True,
    channels_last: bool = True,
    compile: bool = False,
    input_shape: tuple[int, int, int, int] | None = None,
) -> Callable[[Tensor], Tensor]:
    """A callable computing ``net``'s logits for prediction, the fast way asked for.

    Args:
        net: the trained network, on its device (not modified).
        fold: fold each BatchNorm that directly follows a conv into it (``model/fold.py``).
        channels_last: run the network in channels_last memory format.
        compile: ``torch.compile`` it with freezing for ``input_shape``.
        input_shape: ``(batch, 1, tile, tile)``, needed when compiling.
    """
    if fold:
        net, names = fold_batchnorms(net)
        log.info("%d BatchNorms folded into their convolutions", len(names))
    else:
        net = copy.deepcopy(net).eval()  # .to(memory_format) below works in place
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    if compile:
        if input_shape is None:
            raise ValueError("compile=True needs the tiles' input_shape")
        net = FixedShapeCompiled(net, input_shape)
    if not channels_last:
        return net

    def forward(x: Tensor) -> Tensor:
        return net(x.contiguous(memory_format=torch.channels_last))

    return forward
