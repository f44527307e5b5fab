#!/usr/bin/env bash
# The CUDA paths on a GPU host, in one go: the CUDA tests, the whole suite with a GPU present (the
# trainer and GRPO then run on it), and the benchmarks that have a GPU mode. Each step's full log goes
# to OUT/<step>.log; its exit code, seconds and last lines are printed.
#
# Run from the repository root with the package importable (PYTHONPATH=$PWD, or `pip install -e .
# --no-deps`). On a GPU image without our runtime and test dependencies, install them first; stop 26's
# H100 image (torch 2.11, transformers 5.17) lacked fastapi, starlette, pydantic(-core), uvicorn,
# opentelemetry-api, datasets, dill, multiprocess, datasketch, trl, openai, httpx2, httpcore2,
# truststore, jiter, distro (protobuf and grpcio were carried at our versions too, unchecked whether
# needed); schemathesis, selenium and grpcio-tools were not carried, so their tests do not run there.
#
#     bash benchmarks/cuda_check.sh OUT [step ...]     (steps: env test_cuda suite fp8_linear decode
#                                                       train_throughput fp8_vs_bf16 speedrun distributed
#                                                       rollout grpo_step; the last two need TRL)
set -u
OUT=${1:?usage: cuda_check.sh OUT [step ...]}
shift
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
STEPS=${*:-env test_cuda suite fp8_linear decode train_throughput fp8_vs_bf16 speedrun}

run_step() {  # name, seconds allowed, command...
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name"
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "   rc=$rc in $(($(date +%s) - start)) s"
    tail -n "${TAIL:-12}" "$OUT/$name.log"
}

for step in $STEPS; do
    case $step in
    env)
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
        $PY -c "import torch, transformers; from nanoseek import fp8; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'transformers', transformers.__version__, 'blockwise fp8', fp8.has_blockwise_scaled_mm(torch.device('cuda')))"
        $PY -c "from nanoseek.model import cpu_ops; print('cpu kernels', cpu_ops.load() is not None)" ;;
    test_cuda) run_step test_cuda 300 $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py ;;
    suite) TAIL=40 run_step suite 420 $PY -m pytest -q -p no:cacheprovider -n 8 --timeout 300 -rf --continue-on-collection-errors ;;
    fp8_linear) run_step fp8_linear 120 $PY benchmarks/fp8_linear.py --device cuda --repeats 50 ;;
    decode) run_step decode 420 $PY benchmarks/decode.py --device cuda --configs small qwen2-small --rows \
        decode_b1_fp32 roofline_b1_fp32 decode_b1_bf16 decode_b1_int8 decode_b16 decode_b16_bf16 kv_bytes_per_token ;;
    train_throughput) run_step train_throughput 300 $PY benchmarks/train_throughput.py --steps 10 ;;
    fp8_vs_bf16) run_step fp8_vs_bf16 400 $PY benchmarks/train_fp8_vs_bf16.py --steps 300 ;;
    speedrun) TAIL=40 run_step speedrun ${SPEEDRUN_SECONDS:-420} $PY -m nanoseek.cli speedrun ${SPEEDRUN_ARGS:---quick} --runs-dir "${RUNS_DIR:-$OUT/runs}" ;;
    distributed) run_step distributed 200 $PY -m pytest -q -p no:cacheprovider tests/test_distributed.py ;;
    rollout) run_step rollout 200 $PY benchmarks/rollout.py --device cuda --threads 4 ;;
    grpo_step) run_step grpo_step 420 $PY benchmarks/grpo_step.py --device cuda --threads 4 --rounds 3 ;;
    *) echo "unknown step $step"; exit 2 ;;
    esac
done
