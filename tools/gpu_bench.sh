#!/usr/bin/env bash
# Step-speed measurements of the recipes on one GPU, each variant its own `tools/bench_step` process.
#   tools/gpu_bench.sh OUTDIR [VARIANT ...]      (default: every variant below, in order)
# Writes OUTDIR/bench.jsonl (one JSON line per variant, with its name), OUTDIR/log.txt (stderr), and for 3b_z2 and
# 3b_z2_fused OUTDIR/ops_<variant>.txt (torch.profiler operators of one step), for 3b_z2_host OUTDIR/host_3b_z2.txt
# (cProfile). `traffic` times no step: the --traffic count of 3B and 9B, each matmul shape timed on the GPU.
# A failed variant writes {"name", "failed": true} (with "timed_out": true and "limit_s" where it ran out of time).
# BUDGET_S=N: this run may take N seconds (the plan's time, less the install): each variant's time limit is cut
# to what is left, and a variant that would get less than MIN_VARIANT_S (default 45) writes {"name", "skipped":
# "budget", "left_s"} instead of starting. Variant `next` is the next GPU run's plan, most informative first (see
# docs/performance.md, "Next measurements").
# On a CPU (smoke test of this script) set TINY=1: tiny models, 1 step. 3b_loop (launch/train.py at the 3B sizes on
# the demo shards, 40 steps: data wait and the loop's own overhead) needs demo_data/{laion,mmc4,tokenizer} on the machine.
set -uo pipefail
out=${1:?usage: tools/gpu_bench.sh OUTDIR [VARIANT ...]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
STDOUT=$(mktemp)  # one variant's stdout, outside OUTDIR (which holds only the results)
trap 'rm -f "$STDOUT"' EXIT
cd "$(dirname "$0")/.."
S3=launch/specs/openflamingo-3b.yaml
S9=launch/specs/openflamingo-9b.yaml
STEPS=(--steps 8 --warmup 3)
TINY_ARGS=()
if [[ ${TINY:-0} == 1 ]]; then STEPS=(--steps 1 --warmup 1); TINY_ARGS=(--tiny); fi
# the vision tower stays eager: its nn.MultiheadAttention fast path moves less than its compiled graph (compiled_traffic)
COMPILE=(--set engine.compile=true --set "engine.compile_targets=[lm_layers, perceiver, loss]")
AC=(--set engine.activation_checkpointing=true)
BUDGET=${BUDGET_S:-0}  # 0: none
MIN_S=${MIN_VARIANT_S:-45}
time_limit() {  # NAME LIMIT_S: prints the limit the budget leaves; fails (after writing the skip) when too little
  local limit=$2 rest
  if (( BUDGET > 0 )); then
    rest=$(( BUDGET - SECONDS ))
    if (( rest < MIN_S )); then
      echo "{\"name\": \"$1\", \"skipped\": \"budget\", \"left_s\": $rest}" | tee -a "$out/bench.jsonl" >&2
      return 1
    fi
    (( rest < limit )) && limit=$rest
  fi
  echo "$limit"
}
batch() { echo --set data.datasets.mmc4.batch_size="$1" --set data.datasets.laion.batch_size="$2"; }

failed() {  # NAME RC LIMIT_S: the line of a variant that wrote no result; returns 3 if it ran out of time, else 1
  if (( $2 == 124 || $2 == 137 )); then  # timeout's TERM, or its KILL 10 s later
    echo "{\"name\": \"$1\", \"failed\": true, \"timed_out\": true, \"limit_s\": $3}" | tee -a "$out/bench.jsonl"
    return 3
  fi
  echo "{\"name\": \"$1\", \"failed\": true}" | tee -a "$out/bench.jsonl"
  return 1
}

bench() {  # NAME LIMIT_S SPEC [bench_step args...]; returns 1 if it failed, 2 if the budget skipped it, 3 if it timed out
  local name=$1 limit spec=$3 line rc
  limit=$(time_limit "$1" "$2") || return 2
  shift 3
  echo "== $name $(date +%T)" | tee -a "$out/log.txt"
  timeout -k 10 "$limit" python3 tools/bench_step --spec "$spec" "${TINY_ARGS[@]}" "$@" 2>>"$out/log.txt" >"$STDOUT"
  rc=$?
  line=$(grep '^{' "$STDOUT" | tail -1)
  if [[ $line == "{"* ]]; then
    echo "{\"name\": \"$name\", ${line#\{}" | tee -a "$out/bench.jsonl"
    return 0
  fi
  failed "$name" "$rc" "$limit"
}

loop() {  # NAME LIMIT_S SPEC: launch/train.py at the recipe's sizes on the demo shards (demo_data/{laion,mmc4,tokenizer})
  local name=$1 limit spec=$3 run=/tmp/of_ds_loop
  limit=$(time_limit "$1" "$2") || return 2
  local -a sets=(
    --set "model.lm.config={model_type: mpt, d_model: 2048, n_layers: 24, n_heads: 16, vocab_size: 50432, max_seq_len: 2048, expansion_ratio: 4}"
    --set model.lm.name_or_path=null --set model.lm.trust_remote_code=false --set model.vision.pretrained=null
    --set model.tokenizer=demo_data/tokenizer --set model.offline=true
    --set "data.datasets.mmc4.shards=demo_data/mmc4/{000000..000003}.tar"
    --set "data.datasets.laion.shards=demo_data/laion/{000000..000003}.tar"
    --set run.max_steps=40 --set logging.every_n_steps=10 --set logging.progress_bar=false
    --set checkpoint.every_n_steps=100000 --set run.output_dir=$run --set run.name=$name)
  if [[ ${TINY:-0} == 1 ]]; then spec=launch/specs/demo.yaml; sets=(--set run.max_steps=2 --set logging.every_n_steps=1 --set run.output_dir=$run --set run.name=$name); fi
  echo "== $name $(date +%T)" | tee -a "$out/log.txt"
  rm -rf "$run/$name"
  timeout -k 10 "$limit" python3 launch/train.py --spec "$spec" "${sets[@]}" >>"$out/log.txt" 2>&1
  local rc=$?
  if (( rc == 0 )); then
    echo "{\"name\": \"$name\", \"metrics\": $(tail -1 "$run/$name/metrics.jsonl")}" | tee -a "$out/bench.jsonl"
  else
    failed "$name" "$rc" "$limit"
  fi
}

run_variant() {
  case $1 in
    3b_z2) bench 3b_z2 120 $S3 "${STEPS[@]}" --count-ops --breakdown --trace "$out/ops_3b_z2.txt" ;;
    3b_z2_fused) bench 3b_z2_fused 120 $S3 "${STEPS[@]}" --count-ops --set engine.fuse_datasets=true --trace "$out/ops_3b_z2_fused.txt" ;;
    3b_z2_fused_compile) bench 3b_z2_fused_compile 180 $S3 "${STEPS[@]}" --set engine.fuse_datasets=true "${COMPILE[@]}" ;;
    3b_z2_fused_autotune) # Triton matmul templates timed against cuBLAS per shape; a winning template fuses its GELU/bias
      bench 3b_z2_fused_autotune 420 $S3 "${STEPS[@]}" --set engine.fuse_datasets=true "${COMPILE[@]}" --set engine.compile_mode=max-autotune-no-cudagraphs ;;
    3b_z2_fused_cublaslt) # every matmul through cuBLASLt (torch's default sends those without a bias to cuBLAS)
      TORCH_BLAS_PREFER_CUBLASLT=1 bench 3b_z2_fused_cublaslt 120 $S3 "${STEPS[@]}" --set engine.fuse_datasets=true ;;
    3b_z2_compile) bench 3b_z2_compile 180 $S3 "${STEPS[@]}" "${COMPILE[@]}" \
      || bench 3b_z2_compile_xattn 150 $S3 "${STEPS[@]}" --set engine.compile=true --set "engine.compile_targets=[cross_attn, perceiver]" ;;
    3b_z2_host) bench 3b_z2_host 100 $S3 "${STEPS[@]}" --cprofile "$out/host_3b_z2.txt" ;;
    3b_z2_eager) bench 3b_z2_eager 100 $S3 "${STEPS[@]}" --set model.lm.attention=eager ;;
    3b_ddp_compile) bench 3b_ddp_compile 180 $S3 "${STEPS[@]}" --set engine.kind=ddp "${COMPILE[@]}" ;;
    3b_ddp) bench 3b_ddp 100 $S3 "${STEPS[@]}" --set engine.kind=ddp ;;
    3b_ddp_amp) bench 3b_ddp_amp 100 $S3 "${STEPS[@]}" --set engine.kind=ddp --set engine.precision=amp_bf16 ;;
    9b_z2) bench 9b_z2 150 $S9 --steps 4 --warmup 2 ;;
    9b_z2_fused) bench 9b_z2_fused 150 $S9 --steps 4 --warmup 2 --set engine.fuse_datasets=true ;;
    9b_z3_ac) # the largest batch that fits, the loss in 4096-position chunks: the memory plan (11% high at 6x)
      # puts 11x at 137 GiB (8x without chunks); try 12x, 10x, 8x
      for k in 12 10 8; do
        bench "9b_z3_ac_x$k" 200 $S9 --steps 2 --warmup 1 --set engine.zero_stage=3 "${AC[@]}" --set engine.loss_chunk_tokens=4096 \
          $(batch $((32 * k)) $((64 * k)))
        (( $? == 1 )) || break  # a smaller batch only after a failure (out of memory), not after a timeout or skip
      done ;;
    3b_loop) loop 3b_loop 300 $S3 ;;
    traffic) # bytes/FLOPs counted on the meta device, every matmul shape timed on the GPU under cuBLAS and cuBLASLt
      bench traffic_3b 90 $S3 --traffic --time-gemms --set engine.fuse_datasets=true
      bench traffic_9b 90 $S9 --traffic --time-gemms --set engine.fuse_datasets=true ;;
    next) # the next GPU run's plan, most informative first (about 8 minutes, then 9b_z3_ac as the budget allows)
      for v in 3b_z2_fused traffic 3b_z2_fused_cublaslt 3b_z2_fused_compile 3b_z2 9b_z2_fused 3b_ddp 9b_z3_ac; do run_variant $v; done ;;
    *) echo "unknown variant $1" >&2; return 2 ;;
  esac
}

variants=("$@")
[[ ${#variants[@]} -gt 0 ]] || variants=(3b_z2 3b_z2_compile 3b_ddp 9b_z2 9b_z3_ac 3b_ddp_amp)
for v in "${variants[@]}"; do run_variant "$v"; done
exit 0
