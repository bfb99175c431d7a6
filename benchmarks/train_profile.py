"""Where a CPU training step's time goes: eager and compiled, whole batch and micro-batches.

One training step of joenet's network (``--net default``: the default config's, 16-32-64-128-256
with InstanceNorm; ``seed``: the seed's 32-64-128-256 with BatchNorm, what this script profiled
before ``--net`` existed), batch 16 at 256 px, joenet's BCE + Dice, AdamW, fp32, profiled with
``torch.profiler`` after warm-up steps, for four settings: eager and ``torch.compile``, each on
the whole batch and in micro-batches of 2 with accumulated gradients (what
``data.batch_size=2 trainer.accumulate_grad_batches=8`` does). Prints seconds per step and the
share of self CPU time per kind of operator (convolution forward and backward, compiled
kernels, normalisation, activations, optimizer, the rest), so the settings can be compared
row by row. Run::

    python benchmarks/train_profile.py [--batch-size 16] [--micro-batch 2] [--steps 2]
                                       [--net seed]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from networks import NETWORKS, net_kwargs
from torch.profiler import ProfilerActivity, profile

from joenet.losses import BCEDiceLoss
from joenet.model import UNet2d

KINDS = {  # operator name fragment -> kind (first match wins)
    "convolution_backward": "conv backward",
    "mkldnn_convolution": "conv forward",
    "convolution": "conv forward",
    # inductor's C++ kernels are not profiled one by one: their time is the graph call's own
    "CompiledFxGraph": "compiled fused kernels",
    "cpp_fused": "compiled fused kernels",
    "batch_norm": "norm",  # InstanceNorm runs as aten::batch_norm over (1, B * C, H, W)
    "instance_norm": "norm",
    "group_norm": "norm",
    "gelu": "activation",
    "relu": "activation",
    "adamw": "optimizer",
    "_fused_adamw": "optimizer",
    "foreach": "optimizer",
    "binary_cross_entropy": "loss",
    "sigmoid": "loss",
    "copy_": "copies",
    "cat": "copies",
    "add": "elementwise",
    "mul": "elementwise",
}


def _kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for key, kind in KINDS.items() if key.lower() in lowered), "other")


def profile_step(compiled: bool, micro_batch: int | None, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = UNet2d(**net_kwargs(args.net)).train()
    net = torch.compile(model) if compiled else model
    criterion = BCEDiceLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch, size = args.batch_size, args.patch_size
    x = torch.rand(batch, 1, size, size)
    y = (torch.rand(batch, 2, size, size) > 0.9).float()
    chunk = micro_batch or batch

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for i in range(0, batch, chunk):
            loss = criterion(net(x[i : i + chunk]), y[i : i + chunk])
            (loss * (chunk / batch)).backward()
        optimizer.step()

    start = time.perf_counter()
    step()  # warm-up, compilation included
    first = time.perf_counter() - start
    step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    shares: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        shares[_kind(event.key)] += event.self_cpu_time_total
    total = sum(shares.values())
    return {
        "seconds": seconds,
        "first": first,
        "shares": {kind: 100 * value / total for kind, value in shares.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--net", choices=NETWORKS, default="default", help="joenet's network")
    args = parser.parse_args()
    settings = {
        "eager": (False, None),
        f"eager, micro-batch {args.micro_batch}": (False, args.micro_batch),
        "compiled": (True, None),
        f"compiled, micro-batch {args.micro_batch}": (True, args.micro_batch),
    }
    results = {name: profile_step(*setting, args) for name, setting in settings.items()}
    kinds = sorted({k for r in results.values() for k in r["shares"]})
    print(
        f"--net {args.net}: batch {args.batch_size} at {args.patch_size} px, fp32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"| setting | s/step | patches/s | first step s | {' | '.join(kinds)} |")
    print(f"|---|---:|---:|---:|{'---:|' * len(kinds)}")
    base = results["eager"]["seconds"]
    for name, r in results.items():
        cells = " | ".join(f"{r['shares'].get(k, 0.0):.0f} %" for k in kinds)
        print(
            f"| {name} | {r['seconds']:.2f} ({base / r['seconds']:.2f}x) | "
            f"{args.batch_size / r['seconds']:.2f} | {r['first']:.0f} | {cells} |"
        )


if __name__ == "__main__":
    main()
