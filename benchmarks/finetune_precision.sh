#!/usr/bin/env bash
# Fine-tuning on a CPU in float32 and in bf16 autocast (`--trainer.precision bf16-mixed`), the
# two alternated on the same data and split: the unfrozen epochs' training images/s (from
# history.csv: the epoch's batches, loading included), the whole fit's seconds, and the test
# accuracies of each best checkpoint. SEED (default 42) seeds the fit (`--seed_everything`).
#
#   bash benchmarks/finetune_precision.sh SOURCE WORK [ROUNDS] [CLASS ...]
#   bash benchmarks/finetune_precision.sh ../shared/data/caltech101/101_ObjectCategories.tar.gz /tmp/ft-precision 1 \
#       crocodile crocodile_head cougar_body cougar_face ketch schooner lotus water_lilly mandolin electric_guitar
set -u
source=$(realpath "$1") work=$(realpath -m "$2") rounds=${3:-1}
shift 3 2>/dev/null || shift $#
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$here/.venv/bin/python
[ -x "$python" ] || python=python3
classes=()
[ $# -gt 0 ] && classes=(--data.classes "[$(IFS=,; echo "$*")]")
unfreeze=$(grep -o "unfreeze_at_epoch: *[0-9]*" "$here/configs/finetune.yaml" | grep -o "[0-9]*$")
mkdir -p "$work" && cd "$work" || exit 1
for round in $(seq "$rounds"); do
    for precision in 32-true bf16-mixed; do
        runs=$work/runs-$precision-$round-seed${SEED:-42}
        rm -rf "$runs"
        run() { PYTHONPATH=$here WANDB_MODE=disabled "$python" -m caltech_cli "$@" --config "$here/configs/finetune.yaml" \
            --data.source "$source" --data.data_dir data "${classes[@]}" --trainer.enable_progress_bar false \
            --trainer.logger false --trainer.precision "$precision" --trainer.default_root_dir "$runs" \
            --seed_everything "${SEED:-42}"; }
        start=$(date +%s.%N)
        run fit > "$runs.fit.log" 2>&1 || { tail -5 "$runs.fit.log"; exit 1; }
        seconds=$(echo "$(date +%s.%N) - $start" | bc)
        run test --ckpt_path "$runs/best.ckpt" > "$runs.test.log" 2>&1 || { tail -5 "$runs.test.log"; exit 1; }
        rates=$("$python" - "$runs/history.csv" "$unfreeze" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("train/images_per_s") and int(r["epoch"]) >= int(sys.argv[2])]
rates = [float(r["train/images_per_s"]) for r in rows]
print(" ".join(f"{r:.1f}" for r in rates), f"(mean {sum(rates) / len(rates):.1f})")
PY
)
        accuracy=$(grep -E -o "test/acc(_macro)? +[│|]? *[0-9.]+" "$runs.test.log" | tr -s ' ' | tr '\n' ' ')
        printf "round %s %s: fit %.1f s | unfrozen epochs img/s %s | %s\n" "$round" "$precision" "$seconds" "$rates" "$accuracy"
    done
done
