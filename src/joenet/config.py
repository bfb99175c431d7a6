"""Where the configs are, and the OmegaConf resolvers they use."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

_PACKAGE_DIR = Path(__file__).resolve().parent


def source_root() -> Path | None:
    """The repository root when joenet runs from a source checkout (editable install), else None."""
    root = _PACKAGE_DIR.parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "conf").is_dir() else None


def config_dir() -> Path:
    """``joenet/conf`` inside an installed wheel, else the checkout's ``conf/``."""
    packaged = _PACKAGE_DIR / "conf"
    if packaged.is_dir():
        return packaged
    root = source_root()
    if root is None:
        raise FileNotFoundError(f"joenet's configs are missing: neither {packaged} nor conf/")
    return root / "conf"


def default_root_dir() -> str:
    """Runs go under the checkout when there is one, else under the working directory."""
    root = source_root()
    return str(root if root is not None else Path.cwd())


def default_data_dir() -> str:
    """``$JOENET_DATA_DIR``, else ``data/`` of the checkout, else ``~/.cache/joenet/data``.

    None of them depends on the working directory, so the synthetic volume is generated once.
    """
    if os.environ.get("JOENET_DATA_DIR"):
        return os.environ["JOENET_DATA_DIR"]
    root = source_root()
    if root is not None:
        return str(root / "data")
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(cache) / "joenet" / "data")


def cpu_has_bf16_matrix_units() -> bool:
    """The CPU multiplies bf16 matrices in hardware (Intel AMX: Sapphire Rapids and later).

    Measured on such a Xeon (docs/benchmarks.md, "bf16 on a CPU with AMX"): a 2048^2 matmul at
    471 GFLOP/s in bf16 against 124 in fp32, and the default network's training step 1.96x
    faster under bf16 autocast (micro-batches of 2). CPUs with only AVX-512 BF16 dot products
    (no AMX) are not measured and stay fp32; on CPUs without either a bf16 matmul runs ~400x
    slower than fp32.
    """
    # torch.cpu's checks are what inductor and oneDNN dispatch on; absent in an older torch.
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    return bool(amx() and bf16())


def default_precision() -> str:
    """bf16 mixed precision where the hardware has bf16 units, fp16 mixed on older GPUs, else fp32.

    CUDA GPUs with bf16 and CPUs with AMX (``cpu_has_bf16_matrix_units``) get ``bf16-mixed``;
    other CPUs and Apple MPS get fp32. ``trainer.precision=32-true`` forces fp32 anywhere.
    """
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if torch.backends.mps.is_available():
        return "32-true"
    return cpu_precision()


def cpu_precision() -> str:
    """``bf16-mixed`` on a CPU with AMX, else ``32-true`` (``trainer=cpu``, on any machine)."""
    return "bf16-mixed" if cpu_has_bf16_matrix_units() else "32-true"


def has_gpu() -> bool:
    """A CUDA or Apple MPS device is there: the machine trains large batches, not micro-batches."""
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def gpu_or_cpu(on_gpu: Any, on_cpu: Any) -> Any:
    """``on_gpu`` on a machine with a GPU, else ``on_cpu``: ``${joenet.gpu_or_cpu:16,2}``."""
    return on_gpu if has_gpu() else on_cpu


def first_not_null(*values: object) -> object:
    """The first value that is not None (``oc.select`` returns a null instead of its default)."""
    return next((value for value in values if value is not None), None)


def call_target(cfg: DictConfig, **given: Any) -> Any:
    """Call the config's top-level ``_target_`` with the config keys that it takes as arguments.

    A command's config (``conf/predict.yaml``) also holds keys that are not arguments of its
    function (``paths``, ``task_name``, ``hydra``): they stay out, so the keys users type and the
    function's parameters are one list, the function's signature, never a hand-copied one.
    ``given`` adds or replaces arguments (the resolved config itself, a run directory).
    """
    import inspect

    from hydra.utils import get_method

    resolved = OmegaConf.to_container(cfg, resolve=True)
    target = get_method(resolved["_target_"])
    parameters = inspect.signature(target).parameters
    # Called directly, not through hydra.utils.instantiate: ``given`` may hold the config itself,
    # whose own ``_target_`` instantiate would recurse into.
    arguments = {key: value for key, value in resolved.items() if key in parameters}
    return target(**{**arguments, **given})


def sqlite_url(path: str) -> str:
    """``sqlite:///<absolute path>`` for a database file, its folder created (Optuna's storage
    is opened before Hydra creates the sweep directory)."""
    database = Path(path).absolute()
    database.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{database}"


def register_resolvers() -> None:
    """Register the ``joenet.*`` resolvers once (Hydra needs them before composing)."""
    resolvers = {
        "joenet.root_dir": default_root_dir,
        "joenet.data_dir": default_data_dir,
        "joenet.precision": default_precision,
        "joenet.cpu_precision": cpu_precision,
        "joenet.has_cuda": torch.cuda.is_available,
        "joenet.first_not_null": first_not_null,
        "joenet.gpu_or_cpu": gpu_or_cpu,
        "joenet.sqlite_url": sqlite_url,
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
