#!/usr/bin/env bash
# The README's main command at commit bad2c94 (old `tiny` = today's `small`, ITC, fp32, 1 thread,
# 1 loader worker) against today's loop on the same model, objective and batch; 1.25 minutes each, no
# evaluation. Prints each run's last logged pairs/s. Run it on an otherwise idle machine (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$work/old" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git worktree add --detach "$work/old" bad2c94 >/dev/null
common=(--max_train_minutes 1.25 --do_eval false --report_to none)
(cd "$work/old" && "$repo/.venv/bin/accelerate" launch train.py "${common[@]}" --output_dir "$work/out-old" >/dev/null 2>&1)
.venv/bin/accelerate launch train.py "${common[@]}" --preset small --objective itc --per_device_batch_size 64 \
    --caption_mask_probability 0.15 --output_dir "$work/out-new" >/dev/null 2>&1
for run in old new; do
    echo "$run: $(tail -1 "$work/out-$run/training_log.jsonl" | .venv/bin/python -c 'import json,sys; r=json.load(sys.stdin); print(round(r["pairs_per_s"]), "pairs/s at step", r["step"])')"
done
