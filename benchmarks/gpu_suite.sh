#!/usr/bin/env bash
# Everything that needs a GPU, in one command: the Triton tests on CUDA, then the op, kernel and model
# benchmarks. Run from the repository root on a CUDA machine; results and logs go to $OUT (default
# benchmarks/results/gpu), ready to commit.
#
#   bash benchmarks/gpu_suite.sh                 # env, tests, op, model (det on request)
#   STEPS="env tests op" bash benchmarks/gpu_suite.sh   # then STEPS=model: one device call is capped at 10 min
#
# Targets (H100/H200, bf16): op forward+backward >= 60 % of copy bandwidth at stage 1; elsa_swin_tiny >= 1.0x
# Swin-T inference and >= 0.9x its training step; triton >= 10x reference. The static predictions they are
# checked against: benchmarks/kernel_sass.py (no GPU), README "GPU kernels: static cost".
#
# It uses the python3 on the PATH as it is (torch, triton and timm installed) and this checkout's sources
# (PYTHONPATH=src), so it needs no network. Each step has its own time limit and a failing step does not stop
# the others; the exit status is that of the last failure.
set -u
OUT=${OUT:-benchmarks/results/gpu}
STEPS=${STEPS:-"env tests op model"}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || status=$rc
}

for s in $STEPS; do
    case $s in
    env)
        step env 60 bash -c "nvidia-smi; $PY -c 'import torch, triton, timm; print(torch.__version__, triton.__version__, timm.__version__, torch.cuda.get_device_name())'"
        ;;
    tests)  # kernel correctness on the GPU against the reference backend, every gradient and dtype: the
            # CUDA-core and tensor-core kernels, the latter at every tile the autotuner may pick (band.fixed_tile),
            # the flat form and the head-aware entry on channels-last maps (test_triton_heads.py)
        step tests 480 "$PY" -m pytest -q -x -p no:cacheprovider tests/ops/test_triton.py tests/ops/test_triton_heads.py \
            tests/ops/test_aggregate.py tests/layers
        ;;
    op)  # op level at the ELSA-Swin-T stage shapes, batch 128: triton vs native vs reference, the fused-softmax
         # op in the flat form and as the layer calls it (head-aware, channels-last maps: no copies on triton)
        step op 540 "$PY" benchmarks/op_bench.py --device cuda --entries softmax_aggregate,softmax_heads \
            --json "$OUT/op_bench_cuda.json"
        ;;
    model)  # model level, batch 128 at 224, fp32 and bf16 autocast, inference and AdamW training step
        step model 540 "$PY" benchmarks/model_bench.py --models elsa_swin_tiny elsa_swin_small elsa_swin_base \
            elsa_volo_d1_224 --json "$OUT/model_bench_cuda.json"
        ;;
    det)  # Mask R-CNN training step, ELSA-Swin-T vs Swin-T backbone (needs torchvision)
        step det 540 "$PY" benchmarks/det_bench.py --json "$OUT/det_bench_cuda.json"
        ;;
    *)
        echo "unknown step $s (env, tests, op, model, det)"
        status=2
        ;;
    esac
done
exit $status
