"""Training and inference speed of joenet's U-Net against MONAI's BasicUNet, side by side.

Run: ``python benchmarks/train_step_bench.py [--batch-size 4] [--patch-size 256] [--steps 5]``.

Both models get the same batches, loss (joenet's BCE + Dice), AdamW and precision (fp32 on a CPU,
bf16 autocast on a GPU). Printed per model: patches/s for a training step (forward, loss,
backward, optimizer step) and for inference, FLOPs per patch (convolutions, from
``FlopCounterMode`` with the grouped-convolution correction of ``model_figures.py``), the achieved
GFLOP/s and its fraction of the measured fp32 matmul peak of this machine. torch-em's UNet2d is
measured too when ``torch_em`` imports (it needs torchvision, which does not install beside the
CPU build of torch; use a separate venv with torch 2.14.1 + torchvision 0.29.1 for it).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from model_figures import count_gflops
from torch import nn

from joenet.losses import BCEDiceLoss
from joenet.model import UNet2d


def matmul_peak(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """Achieved fp32 matmul GFLOP/s, the ceiling convolutions are compared against."""
    a = torch.rand(size, size, device=device)
    a @ a
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(step: Callable[[], None], steps: int, device: torch.device) -> float:
    step()  # warm-up: allocator, kernel selection
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def measure(model: nn.Module, batch: int, patch: int, steps: int, device: torch.device) -> dict:
    model = model.to(device)
    x = torch.rand(batch, 1, patch, patch, device=device)
    y = (torch.rand(batch, 2, patch, patch, device=device) > 0.9).float()
    criterion = BCEDiceLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()

    def infer() -> None:
        with torch.inference_mode(), autocast:
            model(x)

    model.train()
    train_s = _time(train_step, steps, device)
    model.eval()
    infer_s = _time(infer, steps, device)
    cpu_model = model.to("cpu")
    flops_train = count_gflops(cpu_model, train=True, shape=(1, 1, patch, patch))
    flops_infer = count_gflops(cpu_model, train=False, shape=(1, 1, patch, patch))
    return {
        "train_patches_s": batch / train_s,
        "infer_patches_s": batch / infer_s,
        "train_gflop_s": flops_train * batch / train_s,
        "infer_gflop_s": flops_infer * batch / infer_s,
        "train_gflop": flops_train,
        "infer_gflop": flops_infer,
        "params": sum(p.numel() for p in model.parameters()),
    }


def peers() -> dict[str, Callable[[], nn.Module]]:
    models: dict[str, Callable[[], nn.Module]] = {"joenet UNet2d": UNet2d}
    try:
        from monai.networks.nets import BasicUNet

        models["MONAI BasicUNet"] = lambda: BasicUNet(
            spatial_dims=2, in_channels=1, out_channels=2, features=(32, 32, 64, 128, 256, 32)
        )
    except ImportError:
        print("MONAI not installed (pip install 'joenet[bench]'): its BasicUNet is skipped")
    try:
        from torch_em.model import UNet2d as TorchEmUNet2d

        models["torch-em UNet2d"] = lambda: TorchEmUNet2d(
            in_channels=1, out_channels=2, depth=4, initial_features=32
        )
    except Exception as err:  # ImportError, or torchvision failing beside the CPU torch
        print(f"torch-em skipped: {type(err).__name__}: {str(err)[:100]}")
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    peak = matmul_peak(device)
    print(f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"fp32 matmul peak {peak:.0f} GFLOP/s; batch {args.batch_size}, "
          f"{args.patch_size} px, {args.steps} timed steps")  # fmt: skip
    rows = {name: measure(make(), args.batch_size, args.patch_size, args.steps, device)
            for name, make in peers().items()}  # fmt: skip
    base = rows["joenet UNet2d"]
    print(
        "\n| model | params | train GFLOP/patch | train patches/s | train % of peak "
        "| infer patches/s | infer % of peak | train speed vs joenet |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['params']:,} | {r['train_gflop']:.1f} | {r['train_patches_s']:.2f} "
              f"| {100 * r['train_gflop_s'] / peak:.0f} % | {r['infer_patches_s']:.2f} "
              f"| {100 * r['infer_gflop_s'] / peak:.0f} % "
              f"| {r['train_patches_s'] / base['train_patches_s']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
