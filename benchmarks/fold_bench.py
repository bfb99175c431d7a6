"""Inference forward time per 256 px tile, step by step along prediction's fast path, against
MONAI's BasicUNet (eager and compiled alike), on this machine's CPU, batch 1, fp32.

Rows: joenet eager, with its BatchNorms folded, + channels_last (prediction's default), and
compiled with freezing, contiguous and in channels_last (``compile=true``;
``predict/fast_path.py`` builds every joenet row), and the peer network eager and compiled the
same way. Each is timed in turns so that load changes hit all alike; the median of
``--repeat`` rounds of ``--tiles`` forwards counts. GFLOP/s (convolutions,
``joenet.model.cost``) is compared with an fp32 matmul peak measured between the rounds. Run::

    python benchmarks/fold_bench.py [--tiles 20] [--repeat 5] [--no-compile] [--net seed]
                                     [--profile]

``--profile`` adds where the compiled network's time goes (``torch.profiler`` over ``--tiles``
forwards of a copy compiled with inductor's kernel profiling): oneDNN's convolutions, inductor's
fused kernels (norms, activations, additions, concatenations) and the rest.

``--net default`` (the default) is the network the default config trains (``networks.py``); with
InstanceNorm there is no BatchNorm to fold, so its folded row is the eager network again.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from networks import NETWORKS, inference_ready
from train_step_bench import matmul_peak

from joenet.model.cost import count_gflops
from joenet.model.fold import fold_batchnorms
from joenet.predict.fast_path import compile_frozen, inference_network


def _time(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tiles: int) -> float:
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
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled rows")
    parser.add_argument("--net", choices=NETWORKS, default="default", help="joenet's network")
    parser.add_argument("--profile", action="store_true", help="where compiled time goes")
    args = parser.parse_args()
    eager = inference_ready(args.net)
    shape = (1, 1, args.size, args.size)
    _, names = fold_batchnorms(eager)
    nets: dict[str, tuple[Callable, torch.nn.Module]] = {
        "joenet eager": (eager, eager),
        "joenet folded": (inference_network(eager, channels_last=False), eager),
        "joenet folded + channels_last": (inference_network(eager), eager),
    }
    if not args.no_compile:
        contiguous = inference_network(eager, channels_last=False, compile=True, input_shape=shape)
        nets["joenet compiled, contiguous"] = (contiguous, eager)
        compiled = inference_network(eager, compile=True, input_shape=shape)
        nets["joenet compiled + channels_last (compile=true)"] = (compiled, eager)
    try:
        from monai.networks.nets import BasicUNet

        peer = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2).eval()
        nets["MONAI BasicUNet"] = (peer, peer)
        if not args.no_compile:
            peer_compiled = compile_frozen(peer)  # as joenet's compiled rows
            nets["MONAI BasicUNet compiled"] = (peer_compiled, peer)
    except ImportError as err:
        print(f"MONAI skipped ({err})")
    x = torch.rand(shape)
    compile_s = {}
    for name, (net, _) in nets.items():  # warm-up: allocations, oneDNN caches, compilation
        start = time.perf_counter()
        _time(net, x, 1)
        compile_s[name] = time.perf_counter() - start
        _time(net, x, 2)
    times: dict[str, list[float]] = {name: [] for name in nets}
    peaks = []
    for _ in range(args.repeat):
        peaks.append(matmul_peak(torch.device("cpu"), repeats=5))
        for name, (net, _) in nets.items():
            times[name].append(_time(net, x, args.tiles))
    peak = statistics.median(peaks)
    print(f"--net {args.net}: {len(names)} BatchNorms folded: {', '.join(names) or 'none'}")
    print(f"fp32 matmul peak {peak:.0f} GFLOP/s (median of {args.repeat}, between the rounds)")
    columns = "tiles/s | vs joenet eager | GFLOP/s | % of peak | first call s"
    print(f"| network | ms per {args.size} px tile | {columns} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = statistics.median(times["joenet eager"])
    for name, values in times.items():
        median = statistics.median(values)
        gflop = count_gflops(nets[name][1], train=False, shape=shape)
        print(
            f"| {name} | {1000 * median:.1f} | {1 / median:.2f} | {base / median:.2f}x | "
            f"{gflop / median:.0f} | {100 * gflop / median / peak:.0f} % | {compile_s[name]:.1f} |"
        )
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.profile and not args.no_compile:
        print_profile(eager, shape, args.tiles)


def print_profile(eager: torch.nn.Module, shape: tuple[int, int, int, int], tiles: int) -> None:
    """Shares of the compiled network's forward time: convolutions, fused kernels, the rest."""
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    with inductor_config.patch({"cpp.enable_kernel_profile": True}):  # names each fused kernel
        net = inference_network(eager, compile=True, input_shape=shape)
        x = torch.rand(shape)
        _time(net, x, 2)  # compile and warm up outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _time(net, x, tiles)
    shares = {"oneDNN convolutions": 0.0, "inductor's fused kernels": 0.0, "the rest": 0.0}
    for event in prof.key_averages():
        if "convolution" in event.key:
            kind = "oneDNN convolutions"
        elif "cpp_fused" in event.key:
            kind = "inductor's fused kernels"
        else:
            kind = "the rest"
        shares[kind] += event.self_cpu_time_total
    total = sum(shares.values())
    print(f"\nWhere joenet compiled + channels_last spends its forward ({tiles} tiles profiled):")
    print("| part | ms per tile | share |\n|---|---:|---:|")
    for kind, us in shares.items():
        print(f"| {kind} | {us / 1000 / tiles:.1f} | {100 * us / total:.0f} % |")


if __name__ == "__main__":
    main()
