#!/usr/bin/env bash
# The GPU measurements of issues 4 and 6 in one prepared call, for a session lent a GPU (the
# device tool's `run`, which starts in the repository root; its image's python3 holds PyTorch,
# Triton and CUDA, but not modman). Each part has its own time limit, so one that overruns leaves
# the other's results; everything is written under $OUT (the device tool's output folder) or,
# without it, under benchmarks/results, each part's log beside its JSON. At most 8 minutes
# (240 + 80 + 150 s); copy the JSON files into benchmarks/results.
#
#   bash benchmarks/gpu_session.sh
set -u
out=${OUT:-benchmarks/results}
# modman as installed: the top-level kernels/ folder is the package modman.kernels
# (pyproject.toml's package-dir), which a bare PYTHONPATH=$PWD does not give (benchmarks/kernels.py
# failed to import it, an audit simulating the device); a staged copy of the two does, uninstalled
stage=$(mktemp -d)
cp -r modman "$stage/modman" && cp -r kernels "$stage/modman/kernels"
export PYTHONPATH=$stage:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, modman.kernels; print('torch', torch.__version__, 'triton', triton.__version__)"
# the GPU in the file names as benchmarks/kernels.py writes them by default (kernels-nvidia-h100-80gb-hbm3.json)
gpu=$(python3 -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
# issue 6: the whole bf16 msign, Triton against the faster of eager and compiled torch
timeout 240 python3 benchmarks/kernels.py --full --breakdown --out "$out/kernels-$gpu.json" 2>&1 | tee "$out/kernels-$gpu.log"
echo "kernels: rc=${PIPESTATUS[0]}"
# issue 4: a manifold-Muon step on the GPU next to modman's and torch's Muon, at the issue's
# size (H = 1024) and at H = 4096, where the fp64 eigh of the closed form is expected to dominate
# (solvers.py writes its JSON at the end: a part cut off by its limit leaves only its log)
for run in "1024 30 10 80" "4096 20 5 150"; do
  set -- $run
  timeout $4 python3 benchmarks/solvers.py --device cuda --hidden $1 --steps $2 --warmup $3 --skip-suite \
    --solvers anderson,closed_form,projected --out "$out/solvers-$gpu-h$1.json" 2>&1 | tee "$out/solvers-$gpu-h$1.log"
  echo "solvers H=$1: rc=${PIPESTATUS[0]}"
done
rm -rf "$stage"
