"""The converter's command line: ``python -m joenet.convert`` (or ``joenet.data.convert``)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from joenet.cli import DEBUG_VARIABLE, describe
from joenet.convert.converter import DEFAULT_CHUNKS, LabelMode, _signals, convert
from joenet.convert.readers import SUPPORTED


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m joenet.data.convert`` command line."""
    parser = argparse.ArgumentParser(
        prog="python -m joenet.data.convert",
        description=f"Convert an EM volume into joenet's zarr layout. Inputs: {SUPPORTED}.",
    )
    parser.add_argument("output", type=Path, help="zarr group to create, e.g. cell.zarr")
    parser.add_argument("--raw", required=True, metavar="SOURCE", help="the image volume")
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        type=_label_arg,
        metavar="CLASS=SOURCE",
        help="a label volume, e.g. mito=mito.tif (repeat for more classes)",
    )
    parser.add_argument(
        "--mask", metavar="SOURCE", help="annotated region (nonzero), stored as labels/mask 0/1"
    )
    parser.add_argument(
        "--voxel-size", nargs=3, type=float, metavar=("Z", "Y", "X"), help="voxel size in nm"
    )
    parser.add_argument(
        "--chunks",
        nargs=3,
        type=int,
        default=list(DEFAULT_CHUNKS),
        metavar=("Z", "Y", "X"),
        help="output chunk shape (default: 1 256 256)",
    )
    parser.add_argument(
        "--label-mode",
        choices=get_args(LabelMode),
        default="auto",
        help="auto: 0/1 kept, 0/255 -> 0/1, else instance ids -> nonzero (default); "
        "binary/instances: nonzero -> 1; threshold: value > T -> 1",
    )
    parser.add_argument("--label-threshold", type=float, metavar="T")
    parser.add_argument(
        "--keep-instances",
        action="store_true",
        help="with --label-mode instances, also store labels/<class>_instances (uint32)",
    )
    parser.add_argument(
        "--rescale",
        nargs="*",
        type=float,
        metavar="LOW HIGH",
        help="store raw as uint8 mapped from LOW..HIGH, or from its 0.5-99.5 percentiles when "
        "no values are given (for float or uint16 raw)",
    )
    parser.add_argument(
        "--zstd-level", type=int, default=3, metavar="N", help="default 3 (shared data: 19, slow)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _label_arg(text: str) -> tuple[str, str]:
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(
            f"expected CLASS=SOURCE (e.g. mito=mito.tif), got {text!r}"
        )
    return name, spec


def main(argv: Sequence[str] | None = None) -> int:
    """Run the converter; return the exit status (0 success, 1 error, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    labels = dict(args.label)
    if len(labels) != len(args.label):
        parser.error("--label: a class is given twice")
    if args.rescale is not None and len(args.rescale) not in (0, 2):
        parser.error("--rescale takes no values (percentiles) or two: LOW HIGH")
    rescale = None if args.rescale is None else tuple(args.rescale) or "percentile"
    # Ctrl-C and SIGTERM (a scheduler's kill) stop after the current slab and remove the
    # temporary group.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, _: _signals.append(number))
    try:
        convert(
            args.output,
            args.raw,
            labels,
            mask=args.mask,
            voxel_size_nm=args.voxel_size,
            chunks=args.chunks,
            label_mode=args.label_mode,
            label_threshold=args.label_threshold,
            keep_instances=args.keep_instances,
            rescale=rescale,  # type: ignore[arg-type]
            zstd_level=args.zstd_level,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print("error: interrupted; no output written", file=sys.stderr)
        return 128 + (_signals[0] if _signals else signal.SIGINT)
    except Exception as err:
        if args.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        print(f"error: {describe(err)}", file=sys.stderr)  # the handler of every entry point
        return 1
    return 0
