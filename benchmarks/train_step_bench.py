"""Training and inference speed of joenet's U-Net against MONAI's BasicUNet and torch-em's UNet2d.

Run: ``python benchmarks/train_step_bench.py [--batch-size 16] [--patch-size 256] [--steps 2]``
(``--quick`` leaves out the joenet variants that only explain the default; ``--net seed``
measures the seed's 32-64-128-256 BatchNorm network instead of the default config's, see
``benchmarks/networks.py``).

Every row gets the same batches, loss (joenet's BCE + Dice), AdamW and precision (fp32 on a
CPU, bf16 autocast on a GPU); on a CPU with AMX (``--bf16 auto``) each model's eager rows run
again under bf16 autocast, as training does there. Printed per row: patches/s of a training
step (forward, loss, backward, optimizer step) and of inference, FLOPs per patch (convolutions,
from ``FlopCounterMode`` with the grouped-convolution correction of ``joenet.model.cost``), and
the achieved GFLOP/s as a fraction of this machine's matmul peak in the row's precision (fp32,
or bf16 for the bf16 rows), measured in the same run.

Rows with ``micro-batch m`` split each batch into chunks of ``m`` patches and accumulate the
gradients (Lightning's ``accumulate_grad_batches`` does the same in training): one optimizer step
per batch, so the update is the batch's, except that BatchNorm sees the chunk's statistics. On a
CPU a chunk whose activations fit the last-level cache runs much closer to the matmul peak.

torch-em's ``UNet2d`` (depth 3, 32 initial features: the same 32-64-128-256 widths as joenet)
comes from the ``torch-em`` wheel on PyPI. Its package imports torchvision, which does not
install beside the CPU build of torch, so ``pip install --no-deps torch-em`` is enough: when
``import torch_em`` fails, ``torch_em/model/unet.py`` (which needs only torch and numpy) is
loaded from the installed wheel by its path.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from networks import NETWORKS, net_kwargs
from torch import nn

from joenet.config import cpu_has_bf16_matrix_units
from joenet.losses import BCEDiceLoss
from joenet.model import UNet2d
from joenet.model.cost import count_gflops


@dataclass(frozen=True)
class Row:
    name: str
    make: Callable[[], nn.Module]
    micro_batch: int | None = None  # None: the whole batch in one pass
    channels_last: bool = False
    compile: bool = False
    fused: bool = True  # AdamW's fused kernel; False: the default multi-tensor one
    bf16: bool = False  # bf16 autocast on a CPU too (on a GPU every row runs it)


def matmul_peak(
    device: torch.device,
    size: int = 2048,
    repeats: int = 10,
    dtype: torch.dtype = torch.float32,
    warmups: int = 1,
) -> float:
    """Achieved matmul GFLOP/s in ``dtype``, the ceiling convolutions are compared against."""
    a = torch.rand(size, size, device=device, dtype=dtype)
    for _ in range(warmups):  # a GPU's clocks and cuBLAS's choice settle over a few
        a @ a
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_step(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Mean seconds of ``step`` over ``steps`` calls, after one untimed warm-up call."""
    step()  # warm-up: allocator, kernel selection, compilation
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def measure(row: Row, batch: int, patch: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = row.make().to(device)
    fmt = torch.channels_last if row.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.rand(batch, 1, patch, patch, device=device).contiguous(memory_format=fmt)
    y = (torch.rand(batch, 2, patch, patch, device=device) > 0.9).float()
    if row.compile:
        # Dynamo keeps per-code state across rows (shapes seen, recompile counts): without a
        # reset a later row would compile UNet2d.forward with dynamic shapes, or not at all.
        torch._dynamo.reset()
    net = torch.compile(model) if row.compile else model
    criterion = BCEDiceLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=row.fused)
    bf16 = device.type == "cuda" or row.bf16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    chunk = row.micro_batch or batch

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for i in range(0, batch, chunk):
            with autocast:
                loss = criterion(net(x[i : i + chunk]), y[i : i + chunk])
            (loss * (min(chunk, batch - i) / batch)).backward()
        optimizer.step()

    def infer() -> None:
        with torch.inference_mode(), autocast:
            for i in range(0, batch, chunk):
                net(x[i : i + chunk])

    model.train()
    start = time.perf_counter()
    train_s = seconds_per_step(train_step, steps, device)
    first_s = time.perf_counter() - start - steps * train_s
    model.eval()
    infer_s = seconds_per_step(infer, steps, device)
    cpu_model = model.to("cpu", memory_format=torch.contiguous_format)
    flops_train = count_gflops(cpu_model, train=True, shape=(1, 1, patch, patch))
    flops_infer = count_gflops(cpu_model, train=False, shape=(1, 1, patch, patch))
    return {
        "train_patches_s": batch / train_s,
        "infer_patches_s": batch / infer_s,
        "train_gflop_s": flops_train * batch / train_s,
        "infer_gflop_s": flops_infer * batch / infer_s,
        "train_gflop": flops_train,
        "first_step_s": first_s,
        "params": sum(p.numel() for p in model.parameters()),
        "bf16": bf16,
    }


def torch_em_unet2d() -> type[nn.Module]:
    """torch-em's UNet2d class from the installed wheel, with or without its package importing."""
    try:
        from torch_em.model import UNet2d as TorchEmUNet2d

        return TorchEmUNet2d
    except ImportError:
        spec = importlib.util.find_spec("torch_em")
        if spec is None or not spec.submodule_search_locations:
            raise
    path = Path(spec.submodule_search_locations[0]) / "model" / "unet.py"
    module_spec = importlib.util.spec_from_file_location("torch_em_model_unet", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.UNet2d


def rows(quick: bool, micro_batch: int, net: str = "default", bf16: bool = False) -> list[Row]:
    """The table's rows; ``bf16``: each model's eager rows again under bf16 autocast (CPU)."""
    joenet = "joenet UNet2d"
    kwargs = net_kwargs(net)

    def joenet_net() -> nn.Module:
        return UNet2d(**kwargs)

    table = [
        Row(joenet, joenet_net),
        Row(f"{joenet}, micro-batch {micro_batch}", joenet_net, micro_batch),
    ]
    if not quick:
        table += [
            Row(f"{joenet}, foreach AdamW", joenet_net, fused=False),
            Row(f"{joenet}, channels_last", joenet_net, channels_last=True),
            Row(f"{joenet}, torch.compile", joenet_net, compile=True),
            Row(
                f"{joenet}, micro-batch {micro_batch}, torch.compile",
                joenet_net,
                micro_batch,
                compile=True,
            ),
        ]
    try:
        from monai.networks.nets import BasicUNet

        def basic_unet() -> nn.Module:
            return BasicUNet(
                spatial_dims=2, in_channels=1, out_channels=2, features=(32, 32, 64, 128, 256, 32)
            )

        table += [
            Row("MONAI BasicUNet", basic_unet),
            Row(f"MONAI BasicUNet, micro-batch {micro_batch}", basic_unet, micro_batch),
        ]
    except ImportError:
        print("MONAI not installed (pip install 'joenet[bench]'): its BasicUNet is skipped")
    try:
        torch_em = torch_em_unet2d()

        def torch_em_net() -> nn.Module:
            return torch_em(in_channels=1, out_channels=2, depth=3, initial_features=32)

        table += [
            Row("torch-em UNet2d", torch_em_net),
            Row(f"torch-em UNet2d, micro-batch {micro_batch}", torch_em_net, micro_batch),
        ]
    except Exception as err:  # not installed, or its module failing to import
        print(
            f"torch-em skipped ({type(err).__name__}: {str(err)[:100]}); "
            "pip install --no-deps torch-em"
        )
    if bf16:  # side by side with the fp32 rows above, in the same run
        eager = [row for row in table if not (row.compile or row.channels_last) and row.fused]
        table += [
            Row(f"{row.name}, bf16 autocast", row.make, row.micro_batch, bf16=True) for row in eager
        ]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="only the defaults and the peers")
    parser.add_argument("--net", choices=NETWORKS, default="default", help="joenet's network")
    parser.add_argument(
        "--bf16",
        choices=["auto", "yes", "no"],
        default="auto",
        help="CPU rows under bf16 autocast too (auto: where the CPU has AMX, as training does)",
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16_rows = device.type == "cpu" and (
        args.bf16 == "yes" or (args.bf16 == "auto" and cpu_has_bf16_matrix_units())
    )
    peak = matmul_peak(device)
    # bf16 rows are compared with the bf16 matmul peak: the ceiling of what they run on
    bf16_peak = matmul_peak(device, dtype=torch.bfloat16) if bf16_rows else peak
    where = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    print(
        f"{device} ({where or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fp32 matmul peak {peak:.0f} GFLOP/s"
        + (f", bf16 {bf16_peak:.0f}" if bf16_rows else "")
        + "; "
        f"batch {args.batch_size}, {args.patch_size} px, {args.steps} timed steps; "
        f"joenet: --net {args.net}"
    )
    results = {}
    for row in rows(args.quick, args.micro_batch, args.net, bf16_rows):
        results[row.name] = measure(row, args.batch_size, args.patch_size, args.steps, device)
        print(f"  measured {row.name}", flush=True)
    base = results["joenet UNet2d"]
    print(
        "\n| model | params | train GFLOP/patch | train patches/s | train % of peak "
        "| infer patches/s | infer % of peak | first step s | train vs joenet default |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        ceiling = bf16_peak if r["bf16"] and device.type == "cpu" else peak
        print(
            f"| {name} | {r['params']:,} | {r['train_gflop']:.1f} | {r['train_patches_s']:.2f} "
            f"| {100 * r['train_gflop_s'] / ceiling:.0f} % | {r['infer_patches_s']:.2f} "
            f"| {100 * r['infer_gflop_s'] / ceiling:.0f} % | {r['first_step_s']:.1f} "
            f"| {r['train_patches_s'] / base['train_patches_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
