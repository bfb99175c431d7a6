"""Inference forward time per 256 px tile: joenet eager, joenet with folded BatchNorms, and MONAI's
BasicUNet (the peer network, eager), on this machine's CPU, batch 1, fp32.

Each network is timed in turns (eager, folded, peer, eager, ...) so that load changes hit all
three alike; the median of ``--repeat`` rounds of ``--tiles`` forwards counts. Run::

    python benchmarks/fold_bench.py [--tiles 20] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from joenet.model import UNet2d
from joenet.model.fold import fold_batchnorms


def _time(net: torch.nn.Module, x: torch.Tensor, tiles: int) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(tiles):
            net(x)
        return (time.perf_counter() - start) / tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiles", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    eager = UNet2d(channels=(32, 32, 64, 128, 256), input_norm=False)
    eager.train()
    for _ in range(3):  # running statistics other than 0 / 1, as a trained network has
        eager(torch.rand(4, 1, 128, 128))
    eager.eval()
    folded, names = fold_batchnorms(eager)
    nets = {"joenet eager": eager, "joenet folded": folded}
    try:
        from monai.networks.nets import BasicUNet

        nets["MONAI BasicUNet"] = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2).eval()
    except ImportError as err:
        print(f"MONAI skipped ({err})")
    x = torch.rand(1, 1, args.size, args.size)
    for net in nets.values():  # warm-up: allocations, oneDNN primitive caches
        _time(net, x, 3)
    times: dict[str, list[float]] = {name: [] for name in nets}
    for _ in range(args.repeat):
        for name, net in nets.items():
            times[name].append(_time(net, x, args.tiles))
    print(f"{len(names)} BatchNorms folded: {', '.join(names)}")
    print(f"| network | ms per {args.size} px tile | tiles/s | vs joenet eager |")
    print("|---|---:|---:|---:|")
    base = statistics.median(times["joenet eager"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {1000 * median:.1f} | {1 / median:.2f} | {base / median:.2f}x |")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
