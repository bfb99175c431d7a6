"""The network as prediction runs it: folded BatchNorms, channels_last, and compiled.

Measured on this project's 2-core CPU, batch 1, 256 px tiles, fp32 (``python
benchmarks/fold_bench.py``, docs/fold_bench.md): folding 1.03-1.10x, channels_last another 1.13x
for BatchNorm networks (0.91x for InstanceNorm ones, so ``auto`` leaves it off there), compiling
1.38-1.68x over eager in all (inductor fuses the pointwise ops; with freezing, the weights become
constants that it pre-packs for oneDNN: :func:`compile_frozen`). ``torch.compile`` costs 7-34 s
in every process; on a CPU (fp32, or bf16 as a bf16 network) prediction compiles ahead of time
instead, into an on-disk cache (``compiled_cache.py``), so only a checkpoint's first run pays it.
``compile="auto"`` compiles on a CPU when the run has enough tiles to pay back the compile, or
the load of a cached one.
On GPUs nothing has been measured yet, so ``auto`` leaves them eager.

All of these compute the same function up to float rounding (logits within 1e-4, tested), so
none is part of an output's resume fingerprint.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from joenet.model.fold import fold_batchnorms
from joenet.predict.compiled_cache import load_or_compile
from joenet.predict.tiling import per_sample_norm

log = logging.getLogger(__name__)

# Compiled saves ~80 ms per tile against eager on this CPU with the default network
# (predict_bench, docs/benchmarks.md): 1,000 tiles (40 slices of 1024 x 1024) save ~80 s against
# a 20-65 s first compile, which later runs load from the cache (compiled_cache.py).
CPU_COMPILE_MIN_TILES = 1000
# With the package cached, a run pays ~0.01 s to load it (compiled_cache.load_package; ~6 s
# through inductor before); 100 tiles measured 8.8 s against 15.5 eager and MONAI's 14.5
# (predict_bench, best of three). Kept at 100 until smaller runs are measured.
CPU_CACHED_MIN_TILES = 100
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


def resolve_channels_last(
    channels_last: bool | str, net: nn.Module, device: torch.device, compiled: bool = False
) -> bool:
    """Whether to run ``net`` in channels_last on ``device``; ``compiled``: with ``compile``.

    ``auto``: channels_last, except for networks with per-sample norms (InstanceNorm, GroupNorm,
    the default since) run eager on a CPU: there it measured 0.91x per tile against 1.13x for
    BatchNorm networks, while compiled it is 1.08x for them too (``benchmarks/fold_bench.py``,
    docs/benchmarks.md: inductor fuses the norm passes that cost eager in that layout); on CUDA
    it is what bf16 tensor cores want (unmeasured here).
    """
    channels_last = check_switch(channels_last, "channels_last")
    if channels_last != "auto":
        return bool(channels_last)
    return device.type != "cpu" or compiled or not per_sample_norm(net)


def resolve_compile(
    compile: bool | str, device: torch.device, tiles: int, cached: bool = False
) -> bool:
    """Whether to compile a prediction of ``tiles`` forward passes on ``device``; ``cached``:
    the network's compiled package is in the cache already (only its load to pay)."""
    compile = check_compile(compile)
    if compile != "auto":
        return bool(compile)
    return device.type == "cpu" and tiles >= (
        CPU_CACHED_MIN_TILES if cached else CPU_COMPILE_MIN_TILES
    )


class FixedShapeCompiled(nn.Module):
    """A network compiled for one input shape, eager for any other.

    Prediction sends tiles of one shape (a partial last batch is padded to it), so one
    compilation serves the whole run; an odd shape (a volume smaller than a tile) runs eager
    instead of paying a recompile. ``compiler(net, shape)`` makes the compiled callable; it runs
    at the first call, so that a missing C++ compiler or an unexportable network (whichever
    compiler is used) falls back to eager with one warning.
    """

    def __init__(
        self,
        net: nn.Module,
        shape: tuple[int, int, int, int],
        compiler: Callable[[nn.Module, tuple[int, int, int, int]], Callable[[Tensor], Tensor]]
        | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.shape = shape
        self._compiler = compiler or _torch_compile
        self.compiled: Callable[[Tensor], Tensor] | None = None
        self._failed = False
        self._compiled_once = False

    def forward(self, x: Tensor) -> Tensor:
        if self._failed or x.shape[1:] != self.shape[1:] or x.shape[0] > self.shape[0]:
            return self.net(x)
        batch = x.shape[0]
        if batch < self.shape[0]:  # pad the last batch rather than compile a second shape
            x = torch.cat([x, x.new_zeros((self.shape[0] - batch, *x.shape[1:]))])
        try:
            if self.compiled is None:
                self.compiled = self._compiler(self.net, self.shape)
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
            self._failed = True
            return self.net(x[:batch])
        self._compiled_once = True
        return out


def compile_frozen(net: nn.Module) -> Callable[[Tensor], Tensor]:
    """``torch.compile`` of ``net`` for inference, its weights frozen into the graph as constants
    (so inductor pre-packs them for oneDNN and folds what it can); call it without autograd.

    ``options={"freezing": True}`` alone freezes nothing (torch 2.13): dynamo decides, while it
    traces, whether the weights become graph constants or inputs from the *global* inductor
    flag, and ``options`` only reach inductor after that, so the weights stayed inputs and no
    convolution was pre-packed. The flag is set around the first call, the one that traces:
    callers send one input shape (``dynamic=False``), so there is no later trace, and the
    patch (~30 us) stays out of every later forward pass.
    """
    import torch._inductor.config as inductor_config  # compiling imports inductor anyway

    compiled = torch.compile(net, dynamic=False, options={"freezing": True})
    traced = False

    def run(x: Tensor) -> Tensor:
        nonlocal traced
        if traced:
            return compiled(x)
        with inductor_config.patch(freezing=True):
            out = compiled(x)
        traced = True
        return out

    return run


def _torch_compile(net: nn.Module, shape: tuple[int, int, int, int]) -> Callable[[Tensor], Tensor]:
    # Freezing: inference only, which is all prediction does (forward_tiles: inference_mode).
    return compile_frozen(net)


def _cached_compiler(
    cache_dir: Path, channels_last: bool
) -> Callable[[nn.Module, tuple[int, int, int, int]], Callable[[Tensor], Tensor]]:
    def compiler(net: nn.Module, shape: tuple[int, int, int, int]) -> Callable[[Tensor], Tensor]:
        return load_or_compile(net, shape, channels_last, cache_dir)

    return compiler


def prepared_network(
    net: nn.Module,
    *,
    fold: bool = True,
    channels_last: bool = True,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A copy of ``net`` in eval mode, BatchNorms folded if asked, in its memory format and
    ``dtype`` (None: as trained): what is run (and compiled, and keys the compiled cache)."""
    if fold:
        net, names = fold_batchnorms(net)
        log.info("%d BatchNorms folded into their convolutions", len(names))
    else:
        net = copy.deepcopy(net).eval()  # .to(memory_format) below works in place
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return net.to(dtype=dtype, memory_format=memory_format)


def compiled_weights_dtype(compute_dtype: torch.dtype | None) -> torch.dtype | None:
    """The weights' dtype of a network compiled to run in ``compute_dtype`` (an autocast dtype).

    bf16 is compiled as a bf16 network, weights cast once: an exported graph (the ahead-of-time
    package) does not carry the autocast it was traced under, and a bf16 graph is what AMX
    multiplies. On an AMX CPU the default network's 100 tiles ran compiled in bf16 in 3.7 s,
    eager under bf16 autocast in 6.0 s, compiled in fp32 in 6.2 s (``benchmarks/predict_bench.py
    --precision 32,bf16``, docs/benchmarks.md). fp16 keeps fp32 weights (its range is too narrow
    to hold them safely); fp32 stays fp32.
    """
    return torch.bfloat16 if compute_dtype == torch.bfloat16 else None


def inference_network(
    net: nn.Module,
    *,
    fold: bool = True,
    channels_last: bool = True,
    compile: bool = False,
    input_shape: tuple[int, int, int, int] | None = None,
    compile_cache: Path | None = None,
) -> Callable[[Tensor], Tensor]:
    """A callable computing ``net``'s logits for prediction, the fast way asked for.

    Args:
        net: the trained network, on its device (not modified).
        fold: fold each BatchNorm that directly follows a conv into it (``model/fold.py``).
        channels_last: run the network in channels_last memory format.
        compile: compile it with freezing for ``input_shape``.
        input_shape: ``(batch, 1, tile, tile)``, needed when compiling.
        compile_cache: compile ahead of time into (or load from) this directory
            (``compiled_cache.py``); None: ``torch.compile`` in this process.
    """
    return inference_form(
        prepared_network(net, fold=fold, channels_last=channels_last),
        channels_last=channels_last,
        compile=compile,
        input_shape=input_shape,
        compile_cache=compile_cache,
    )


def inference_form(
    prepared: nn.Module,
    *,
    channels_last: bool,
    compile: bool = False,
    input_shape: tuple[int, int, int, int] | None = None,
    compile_cache: Path | None = None,
) -> Callable[[Tensor], Tensor]:
    """:func:`inference_network` of a network already :func:`prepared_network` (used as is)."""
    net: Callable[[Tensor], Tensor] = prepared
    if compile:
        if input_shape is None:
            raise ValueError("compile=True needs the tiles' input_shape")
        compiler = None if compile_cache is None else _cached_compiler(compile_cache, channels_last)
        net = FixedShapeCompiled(prepared, input_shape, compiler)
    first = next(prepared.parameters(), None)
    dtype = first.dtype if first is not None else torch.float32
    if not channels_last and dtype == torch.float32:
        return net
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(x: Tensor) -> Tensor:
        return net(x.to(dtype=dtype, memory_format=memory_format))

    return forward
