#!/usr/bin/env bash
# The accelerator benchmark suite behind BENCHMARKS.md, one tools/bench.py run per line.
#
#   tools/bench_suite.sh OUT_DIR [CONFIG] [BATCH]      (defaults: configs/mdtv2_xl2.py, 32)
#
# CONFIG is a path from the repository root (or absolute); OUT_DIR may be relative to here.
#
# Each run writes OUT_DIR/<name>.json and OUT_DIR/<name>.log and is cut off after $LIMIT seconds
# (default 240) so that one failure does not stop the rest. SKIP="name name" skips runs,
# ONLY="name name" runs only those.
# The sampling run compares with two float32 eager baselines: JAX without jit, and PyTorch
# (the original's framework) where torch is installed. Compiled programs are cached in
# $JAX_COMPILATION_CACHE_DIR (default /tmp/mdt_jax_bench_cache), so a profile run of a program
# already timed does not compile it again.
set -u
OUT=${1:?usage: tools/bench_suite.sh OUT_DIR [CONFIG] [BATCH]}
CONFIG=${2:-configs/mdtv2_xl2.py}
BATCH=${3:-32}
LIMIT=${LIMIT:-240}
PY=${PYTHON:-python3}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)     # absolute: the runs start in the repository root
cd "$(dirname "$0")/.."

bench() {   # bench NAME ARGS...
  local name=$1; shift
  case " ${SKIP:-} " in *" $name "*) echo "skip $name"; return;; esac
  if [ -n "${ONLY:-}" ]; then
    case " $ONLY " in *" $name "*) ;; *) return;; esac
  fi
  echo "== $name: $*"
  timeout "$LIMIT" "$PY" tools/bench.py --config="$CONFIG" --config.global_batch_size="$BATCH" \
      --steps=5 --repeats=3 --out="$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $? ($(grep -c '' "$OUT/$name.log") log lines)"
  grep '^|' "$OUT/$name.log" | tail -4
}

BF16=--config.model.dtype=bfloat16
CUDNN="--config.model.attention_impl=cudnn --config.model.mask_buffer_multiple=8"
TORCH=$("$PY" -c 'import torch' 2>/dev/null && echo --torch_baseline)
# Runs of the same program (bf16 and its profile, bf16_cudnn and its profile) compile once.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/mdt_jax_bench_cache}

# In order of what the performance issue needs most, so that a short session gets the most.
# 1. Is cuDNN's fused attention (the masked buffer padded to 184: cuDNN trains with a bias only
#    on even lengths) the same training signal as XLA's? A 6-block XL/2-wide model, batch 8.
bench parity_cudnn $BF16 $CUDNN --config.model.depth=6 --modes= --parity_batch=8 \
    --parity=attention_impl=xla,mask_buffer_multiple=1 \
    --parity=dtype=float32,attention_impl=xla,mask_buffer_multiple=1
bench bf16 $BF16 --modes=mdt
bench bf16_cudnn $BF16 $CUDNN --modes=mdt
bench bf16_profile $BF16 --modes= --profile="$OUT/trace"
# JAX would otherwise reserve most of the GPU's memory up front and leave PyTorch none
XLA_PYTHON_CLIENT_PREALLOCATE=false \
    bench bf16_sampling $BF16 --modes= --sampling --sample_batch="$BATCH" --eager_baseline \
    --baseline_steps=50 $TORCH
# cuDNN for the full-length passes only (the fallback if the masked encoder's per-sample bias
# gradient is refused, and the full-length passes' share of the gain)
bench bf16_cudnn_plain $BF16 --config.model.attention_impl=cudnn \
    --config.model.masked_attention_impl=xla --modes=mdt
bench bf16_cudnn_profile $BF16 $CUDNN --modes= --profile="$OUT/trace_cudnn"
bench bf16_cudnn_sampling $BF16 $CUDNN --modes= --sampling --sample_batch="$BATCH"
bench bf16_stream_bf16 $BF16 --modes=mdt --config.model.residual_dtype=compute
bench bf16_dit $BF16 --modes=dit
bench bf16_cudnn_dit $BF16 $CUDNN --modes=dit
bench bf16_pad8 $BF16 --modes=mdt --config.model.mask_buffer_multiple=8
bench bf16_batch2x $BF16 --modes=mdt --config.global_batch_size=$((2 * BATCH))
bench bf16_batch4x_remat $BF16 --modes=mdt --config.global_batch_size=$((4 * BATCH)) \
    --config.model.remat=true --config.model.remat_policy=dots_saveable
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" \
    bench bf16_no_triton_gemm $BF16 --modes=mdt
# compile-only: batch 32 and 64 give the affine line, its guess and the next batch settle it
bench bf16_fit80 $BF16 --modes= --fit_memory_gb=80 --fit_remat=off --fit_max_compiles=4
bench bf16_fit80_remat $BF16 --modes= --fit_memory_gb=80 --fit_remat=on --fit_max_compiles=4
bench f32 --config.model.dtype=float32 --modes=mdt
echo "suite done: $OUT"
