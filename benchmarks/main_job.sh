#!/usr/bin/env bash
# The README's main job (`caltech fit` then `caltech test`, configs/transfer.yaml) with two
# checkouts of caltech alternated, each from an empty feature cache, two rounds: whole-command
# seconds, the feature passes caltech prints, and the test accuracies.
#
#   bash benchmarks/main_job.sh OLD_CHECKOUT NEW_CHECKOUT SOURCE WORK
#   bash benchmarks/main_job.sh /tmp/old . ../shared/data/caltech101/101_ObjectCategories.tar.gz /tmp/main-job
#
# Both run with this checkout's .venv (or python3); WORK/<old|new>/data keeps each one's extracted data.
set -u
old=$(realpath "$1") new=$(realpath "$2") source=$(realpath "$3") work=$(realpath -m "$4")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$here/.venv/bin/python
[ -x "$python" ] || python=python3
for round in 1 2; do
    for code in old new; do
        repo=$old
        [ "$code" = new ] && repo=$new
        mkdir -p "$work/$code" && cd "$work/$code" && rm -rf data/feature-cache runs
        run() { PYTHONPATH=$repo WANDB_MODE=disabled "$python" -m caltech_cli "$@" --config "$repo/configs/transfer.yaml" \
            --data.source "$source" --data.data_dir data --trainer.enable_progress_bar false; }
        start=$(date +%s.%N)
        run fit > fit.log 2>&1 || { tail -5 fit.log; exit 1; }
        middle=$(date +%s.%N)
        run test --ckpt_path runs/transfer/best.ckpt > test.log 2>&1 || { tail -5 test.log; exit 1; }
        end=$(date +%s.%N)
        accuracy=$(grep -E -o "test/acc(_macro)? +[│|]? *[0-9.]+" test.log | tr -s ' ' | tr '\n' ' ')
        passes=$(grep -h -o "Cached .* features of [0-9]* images.*" fit.log test.log | sed 's/ in [^ ]* (/ (/' | tr '\n' ';')
        printf "round %s %s: fit %.1f s, test %.1f s | %s| %s\n" "$round" "$code" \
            "$(echo "$middle - $start" | bc)" "$(echo "$end - $middle" | bc)" "$accuracy" "$passes"
    done
done
