#!/usr/bin/env bash
# AEPO in verl 0.9.1 (docs/verl.md): the aepo_tree agent loop, the aepo loss and
# the aepo_entropy advantage on verl's own trainer, no verl source edit. Run from the repository root:
#
#   bash examples/verl/run.sh                          # Qwen3-14B, 8 GPUs, the paper's settings
#   CONFIG=smoke_1gpu bash examples/verl/run.sh        # 1 GPU, small random-weight Qwen3, 2 steps
#   bash examples/verl/run.sh actor_rollout_ref.model.path=Qwen/Qwen3-8B trainer.total_training_steps=100
#
# Extra arguments are hydra overrides of the config (examples/verl/$CONFIG.yaml). Environment:
#   CONFIG   aepo_qwen3_8gpu (default) or smoke_1gpu
#   TRAIN    questions to train on (any file `aepo data to-verl` reads); VAL the validation questions
#   SEARCH   aepo's search cache (JSON) for the search tool (aepo_qwen3_8gpu only)
#   PYTHON   the interpreter with aepo[verl-gpu] installed (default: .venv-verl/bin/python, else python3);
#            docs/verl.md, "Install"
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CONFIG=${CONFIG:-aepo_qwen3_8gpu}
PYTHON=${PYTHON:-$([ -x "$ROOT/.venv-verl/bin/python" ] && echo "$ROOT/.venv-verl/bin/python" || echo python3)}
OUT=${OUT:-$ROOT/runs/verl}
mkdir -p "$OUT"

case "$CONFIG" in
  smoke_1gpu)
    TRAIN=${TRAIN:-$ROOT/../shared/data/benchmarks/gsm8k.jsonl}
    VAL=${VAL:-$TRAIN}
    TOOLS=calc
    CALLS=2
    MODEL="$ROOT/runs/verl-smoke-model"
    [ -f "$MODEL/config.json" ] || "$PYTHON" -m aepo.cli model init "$MODEL" --preset small
    EXTRA=("actor_rollout_ref.model.path=$MODEL")
    LIMIT=(--limit 64)
    ;;
  *)
    TRAIN=${TRAIN:-$ROOT/../shared/data/benchmarks/hotpotqa.jsonl}
    VAL=${VAL:-$ROOT/../shared/data/benchmarks/bamboogle.jsonl}
    TOOLS=search,python
    CALLS=6
    SEARCH=${SEARCH:-$ROOT/../shared/data/search_cache.json}
    EXTRA=("actor_rollout_ref.rollout.custom.aepo.tool_config.search_cache=$(realpath "$SEARCH")")
    LIMIT=()
    ;;
esac

for f in "$TRAIN" "$VAL" ${SEARCH:+"$SEARCH"}; do
  [ -f "$f" ] || { echo "run.sh: $f does not exist; set TRAIN / VAL (benchmark JSONL) and SEARCH (search cache) to your files" >&2; exit 2; }
done

# verl's RL parquet with aepo's system prompt (the tools the loop runs) and reward function
for split in train val; do
  src=$([ "$split" = train ] && echo "$TRAIN" || echo "$VAL")
  dst="$OUT/$CONFIG-$split.parquet"
  [ -f "$dst" ] || "$PYTHON" -m aepo.cli data to-verl "$src" "$dst" --tools "$TOOLS" --max-tool-calls "$CALLS" \
    --split "$split" "${LIMIT[@]}"
done
REWARD=$("$PYTHON" -c "import aepo.integrations.verl_task as m; print(m.__file__)")

# verl's main_ppo with aepo's checks first (one line and exit 2 before Ray starts on a wrong setting)
exec "$PYTHON" -m aepo.integrations.verl_main --config-path "$HERE" --config-name "$CONFIG" \
  data.train_files="$OUT/$CONFIG-train.parquet" data.val_files="$OUT/$CONFIG-val.parquet" \
  reward.custom_reward_function.path="$REWARD" reward.custom_reward_function.name=compute_score \
  "${EXTRA[@]}" "$@"
