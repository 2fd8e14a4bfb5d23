#!/usr/bin/env bash
# CPU seconds per training step of train.py's default recipe: an older commit (default 1a09f4e)
# against this tree, side by side on one machine. Each tree trains SHORT and LONG steps (no evaluation,
# no checkpoints); the difference of the two runs' process CPU time (user + system, /usr/bin/time)
# over LONG - SHORT steps is the cost of a step, start-up excluded. CPU time, not wall time: on a
# shared machine other jobs lengthen the wall clock far more than the work. The trees alternate for
# ROUNDS rounds; results are appended as JSON lines to OUT.
#
#   bash benchmarks/step_cost_vs_commit.sh                    # 1a09f4e vs this tree, 1 thread, 2 rounds
#   COMMIT=abc1234 THREADS=2 ROUNDS=3 bash benchmarks/step_cost_vs_commit.sh
#   TRAIN_ARGS="--preset small" bash benchmarks/step_cost_vs_commit.sh   # flags both trees understand
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
commit=${COMMIT:-1a09f4e}
threads=${THREADS:-1}
rounds=${ROUNDS:-2}
short=${SHORT:-40}
long=${LONG:-240}
out=${OUT:-outputs/step_cost_vs_${commit}.jsonl}
read -r -a train_args <<<"${TRAIN_ARGS:-}"
mkdir -p "$(dirname "$out")"
work=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$work/old" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git worktree add --detach "$work/old" "$commit" >/dev/null

cpu_seconds() {  # tree steps -> "user system wall" of one train.py run
    local tree=$1 steps=$2 dir
    dir=$(mktemp -d -p "$work")
    (cd "$tree" && PYTHONPATH="$tree" OMP_NUM_THREADS=$threads /usr/bin/time -o "$dir/time" -f "%U %S %e" \
        "$repo/.venv/bin/python" train.py --max_steps "$steps" --num_threads "$threads" --do_eval false \
        --report_to none --checkpointing_steps 0 --output_dir "$dir/out" ${train_args[@]+"${train_args[@]}"} >"$dir/log" 2>&1) \
        || { echo "train.py failed in $tree:" >&2; tail -5 "$dir/log" >&2; exit 1; }
    cat "$dir/time"
}

for round in $(seq "$rounds"); do
    for tree in "$work/old" "$repo"; do
        read -r u1 s1 w1 <<<"$(cpu_seconds "$tree" "$short")"
        read -r u2 s2 w2 <<<"$(cpu_seconds "$tree" "$long")"
        name=$([ "$tree" = "$repo" ] && echo "this tree ($(git rev-parse --short HEAD))" || echo "$commit")
        python3 - "$name" "$round" "$threads" "$short" "$long" "$u1" "$s1" "$w1" "$u2" "$s2" "$w2" <<'EOF' | tee -a "$out"
import json, os, sys
name, round_, threads, short, long_ = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
u1, s1, w1, u2, s2, w2 = map(float, sys.argv[6:])
steps = long_ - short
print(json.dumps({"tree": name, "round": round_, "threads": threads, "steps": steps,
                  "cpu_s_per_step": round((u2 + s2 - u1 - s1) / steps, 4),
                  "system_s_per_step": round((s2 - s1) / steps, 4),
                  "wall_s_per_step": round((w2 - w1) / steps, 4),
                  "loadavg": os.getloadavg()[0]}))
EOF
    done
done
