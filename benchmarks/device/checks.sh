#!/usr/bin/env bash
# The GPU checks, as one prepared command for the device machine (it has torch, transformers, peft, timm, pandas and
# pytest, no internet). Here: `bash benchmarks/device/kit.sh KIT` packs .device/; there, from the repo root:
#   bash benchmarks/device/checks.sh llm     # under 8 min: CUDA unit tests (attention, eigh), QLoRA table, FSDP1
#                                            # tests (stopping at the first failure)
#   bash benchmarks/device/checks.sh vbll    # under 5 min: VBLL step-cost table, eager and with compile_loss
#   bash benchmarks/device/checks.sh mnist   # under 7 min: the compiled per-example Jacobians' CUDA tests, VIKING
#                                            # epoch / MAP epoch on the GPU, eager and with compile_jacobian
#   bash benchmarks/device/checks.sh speed   # (kit.sh all) under 8 min: the compiled VBLL table, the Jacobians' CUDA
#                                            # tests and a shorter VIKING table (issues 3 and 6 in one call)
#   bash benchmarks/device/checks.sh leaderboard  # (kit.sh leaderboard) about 8 min of the full MNIST leaderboard,
#     resumed from .device/leaderboard-state/ (the parts the last lease returned); returns the newest table and
#     the state as $OUT/leaderboard-state-part-NN; here, before the next lease:
#       mkdir -p .device/leaderboard-state && cp FILES_AT/leaderboard-state-part-* .device/leaderboard-state/
#       bash benchmarks/device/kit.sh leaderboard   # after the copy: it keeps the state and checks the 64 MiB in all
# (device `run` with carry [".device"] and timeout_s 600). Every step has its own time limit and writes
# $OUT/<step>.txt (at most 8 files come back), so one failing or slow step does not cost the others.
# The packaged SmolLM2's weights (about 100 MB) do not fit the 64 MiB a call carries: the llm kit carries its
# config and tokenizer and the model is rebuilt there with random weights, which is what step time and memory
# depend on (the CUDA 4-bit test that reads real reviews needs the real weights and is not run here).
set -uo pipefail
kits="llm|vbll|mnist|speed|leaderboard"  # one call each (a 10-min call holds one; $OUT starts empty)
case "${1:-}" in
  llm|vbll|mnist|speed|leaderboard) kit="$1" ;;
  -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;  # this header
  *) echo "usage: checks.sh $kits (--help: what each runs); got '${1:-}'" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/../.." || exit 1
out="${OUT:-runs/device}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/wheels/*.whl \
  || { echo "installing the carried wheels failed" >&2; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 LIGHTNING_BAYES_HOME=/tmp/lightning_bayes

failed=0
step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, its output to $out/NAME.txt
  local name="$1" limit="$2" status
  shift 2
  echo "== $name (limit ${limit} s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  status=${PIPESTATUS[0]}
  echo "exit $status" | tee -a "$out/$name.txt"
  if [ "$status" -ne 0 ]; then failed=1; fi
}

{ nvidia-smi
  python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
  python3 -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)"  # the llm kits carry it
} >"$out/machine.txt" 2>&1
llm_steps() {
  python3 benchmarks/device/random_weight_model.py .device/smollm2-shape \
    "$LIGHTNING_BAYES_HOME/models/smollm2-135m-instruct" || failed=1
  step gpu_unit_tests 90 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu -k "not compiled" \
    tests/models/test_attention.py tests/inference/test_linalg.py
  step qlora_overhead 170 python3 benchmarks/llm_overhead.py --four-bit --steps 10 --warmup 3 --data-dir .device/data
  step fsdp1_tests 240 python3 -m pytest -x -q -p no:cacheprovider --tb=short -m gpu tests/modules/test_fsdp1.py
}
vbll_compiled() {
  step vbll_compiled 150 python3 benchmarks/vbll_overhead.py --device cuda --parameterizations dense diagonal \
    --case 512 10 128 --case 84 10 128 --compile --backbones lenet resnet18
}
vbll_step() {
  step vbll_overhead 110 python3 benchmarks/vbll_overhead.py --device cuda --parameterizations dense
  vbll_compiled
}
mnist_data() {
  export LIGHTNING_BAYES_DATA="$PWD/.device/data/mnist" LIGHTNING_BAYES_FASHION_DATA="$PWD/.device/data/fashion"
}
viking_step() {  # viking_step TEST_SECONDS TABLE_SECONDS BATCHES REPEATS: the compiled Jacobians' tests, the table
  mnist_data
  step compiled_jacobian_tests "$1" python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu -k compiled \
    tests/inference/test_linalg.py
  step viking_overhead "$2" python3 benchmarks/viking_overhead.py --accelerator cuda --batches "$3" --repeats "$4" \
    --compile
}
leaderboard_step() {  # one lease's share of a leaderboard; `--resume` goes on from the last lease's state
  mnist_data
  local task="${LEADERBOARD_TASK:-mnist}" state=/tmp/leaderboard  # fixed: results name checkpoints by absolute path
  mkdir -p "$state"
  if compgen -G ".device/leaderboard-state/leaderboard-state-part-*" >/dev/null; then
    cat .device/leaderboard-state/leaderboard-state-part-* | tar -xzf - -C "$state"
  fi
  step leaderboard "${LEADERBOARD_SECONDS:-480}" python3 benchmarks/leaderboard.py --task "$task" --resume \
    --out "$state/$task" --threads 16
  python3 benchmarks/device/leaderboard_state.py "$state" "$task" | tar -czf - -C "$state" -T - \
    | split -b 15m -d - "$out/leaderboard-state-part-"
  newest=$(ls -t "$state/$task"/leaderboard*.md 2>/dev/null | head -1)
  if [ -n "$newest" ]; then cp "$newest" "$out/leaderboard.md"; fi
  ls -la "$out"
}
case "$kit" in
  llm) llm_steps ;;
  vbll) vbll_step ;;
  mnist) viking_step 120 300 150 3 ;;
  speed) vbll_compiled; viking_step 90 200 100 2 ;;  # the compiled paths of issues 3 and 6 in one call
  leaderboard) leaderboard_step ;;
esac
exit "$failed"  # non-zero when any step failed or ran out of time
