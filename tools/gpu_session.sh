#!/usr/bin/env bash
# The step-speed plan as one run of at most 10 minutes on one GPU: install the wheels in .whl/ where packages are
# missing, record the versions, then run tools/gpu_bench.sh within the time left (docs/performance.md, "Next measurements").
#   tools/gpu_session.sh OUTDIR [VARIANT ...]      (default: next)
# BUDGET_S (default 540, counted from this script's start; 0: none) is what gpu_bench.sh may use: it cuts or skips
# variants so that the run ends with every line written.
set -uo pipefail
out=${1:?usage: tools/gpu_session.sh OUTDIR [VARIANT ...]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
# found, not imported: importing them costs seconds of the budget, and every variant imports them anyway
if ! python3 -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('deepspeed', 'open_clip', 'webdataset', 'pydantic'))))" 2>/dev/null && [[ -d .whl ]]; then
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$out/log.txt" 2>&1; then
    echo "installing .whl failed:" >&2
    tail -20 "$out/log.txt" >&2
    exit 1
  fi
  export PYTHONPATH=/tmp/site:$PWD
fi
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1  # an H100/H200's 9.0a is more than DeepSpeed's op builder parses
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  # from the installed packages' metadata and torch/version.py, without importing them (seconds of the budget)
  python3 - <<'EOF' 2>&1
import importlib.metadata as md, importlib.util, os, runpy
torch = runpy.run_path(os.path.join(importlib.util.find_spec("torch").submodule_search_locations[0], "version.py"))
print("torch", torch["__version__"], "cuda", torch["cuda"], "deepspeed", md.version("deepspeed"), "transformers", md.version("transformers"))
EOF
} >"$out/versions.txt"
cat "$out/versions.txt"
BUDGET_S=${BUDGET_S:-540}
if (( BUDGET_S > 0 )); then  # what the install and the versions left of it (0: no budget)
  BUDGET_S=$(( BUDGET_S - SECONDS ))
  (( BUDGET_S > 0 )) || BUDGET_S=1
fi
BUDGET_S=$BUDGET_S exec bash tools/gpu_bench.sh "$out" "${@:-next}"
