#!/bin/sh
# make bench-gpu on a GPU machine that reaches no package index (the device tool's H200):
# install the wheels benchmarks/offline_wheels.py fetched beside the image's own packages, then
# run benchmarks/gpu_check.py from the checkout. Run from the repository root:
#
#   sh benchmarks/gpu_check_offline.sh WHEELS OUT [gpu_check options...]
#
# e.g. sh benchmarks/gpu_check_offline.sh .whl "$OUT/gpu_check" --parts prediction,train\ step
# OUT.md and OUT.csv are rewritten after each part, so a run stopped at its time limit keeps them.
set -eu
wheels=${1:?wheels folder (python benchmarks/offline_wheels.py --dest .whl)}
out=${2:?output prefix (writes OUT.md and OUT.csv)}
shift 2
site=$(mktemp -d)
python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
    --target "$site" "$wheels"/*.whl
# The checkout's src/ rather than an install: no build backend there either.
export PYTHONPATH="$site:$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import joenet, hydra, zarr, monai, torch; print('joenet', joenet.__version__, \
'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec python3 benchmarks/gpu_check.py --out "$out" "$@"
