#!/usr/bin/env bash
# SmolLM2-135M-Instruct trained end to end in its own tool-call format (hermes), on a CPU:
# expert demonstrations -> LoRA SFT -> merge -> held-out eval -> GRPO and AEPO x 2 seeds -> evals.
#
#   bash benchmarks/smollm2_hermes.sh SMOLLM2_DIR [OUT]      # OUT defaults to runs/smol
#
# SMOLLM2_DIR comes from `aepo model import-smollm2` (its extra: docs/usage.md). Each command's
# exit status and wall seconds go to OUT/times.tsv, its output to OUT/<name>.log; the held-out
# pass@1 of every model is in OUT/eval-*/summary.md. About 90 minutes on 2 CPU cores
# (benchmarks/RESULTS.md, "SmolLM2-135M-Instruct in the hermes format").
set -u
if [ $# -lt 1 ] || [ "$1" = "--help" ] || [ "$1" = "-h" ]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
BASE=$1
R=${2:-runs/smol}
AEPO=${AEPO:-aepo}
CONFIG=$(dirname "$0")/../examples/smollm2_hermes.yaml
mkdir -p "$R"
# the settings the SFT model carries into RL and evaluation (its aepo_run.yaml): the same as CONFIG's
SET="model.chat_template=true rollout.tool_format=hermes tools.enabled=[search,calc] tools.search_topk=2
     rollout.max_tool_calls=4 rollout.max_response_tokens=512 rollout.max_result_tokens=128 rollout.temperature=0.7"
LORA="actor.lora.rank=32 actor.lora.alpha=64 actor.lora.layers_to_transform=[22,23,24,25,26,27,28,29]"
EVAL="--data $R/world/test.jsonl --search-corpus $R/world/corpus.jsonl --limit 200 --n 1"

timed() {
  local name=$1; shift
  echo "+ $*" | tee "$R/$name.log"
  local t0; t0=$(date +%s.%N)
  "$@" >> "$R/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%.1f\n' "$name" "$rc" "$(echo "$(date +%s.%N) - $t0" | bc)" >> "$R/times.tsv"
  return $rc
}

timed world $AEPO world build "$R/world"
timed demos $AEPO world demos "$R/demos640.jsonl" --n 640 --worlds 8
# shellcheck disable=SC2086  # SET and LORA are lists of overrides
timed sft $AEPO sft --model "$BASE" --data "$R/demos640.jsonl" --out "$R/sft-adapter" $SET $LORA \
  sft.lr=1e-3 sft.batch_size=8 sft.warmup_steps=5 sft.max_len=1024 sft.epochs=1 || exit 1
timed merge $AEPO model merge "$R/sft-adapter" "$R/sft" || exit 1
# shellcheck disable=SC2086
timed eval-sft $AEPO eval "$R/sft" $EVAL --out "$R/eval-sft"
for seed in 0 1; do
  for algo in grpo aepo; do
    timed "train-$algo-s$seed" $AEPO train "$CONFIG" model.path="$R/sft" algo=$algo trainer.seed=$seed \
      out_dir="$R/$algo-s$seed" || continue
    # shellcheck disable=SC2086
    timed "eval-$algo-s$seed" $AEPO eval "$R/$algo-s$seed/final" $EVAL --out "$R/eval-$algo-s$seed"
  done
done
grep -h "^| test" "$R"/eval-*/summary.md
