#!/usr/bin/env bash
# `caltech predict` with two checkouts of caltech alternated, two rounds, one view: over a folder of
# images and over its first image alone (the start-up), whole-command seconds; then whether the
# two wrote the same classes.
#
#   bash benchmarks/predict_pair.sh OLD_CHECKOUT NEW_CHECKOUT CKPT FOLDER WORK
#
# Each checkout keeps its data (and its engine graphs) under WORK/<old|new>/data.
set -u
old=$(realpath "$1") new=$(realpath "$2") ckpt=$(realpath "$3") folder=$(realpath "$4") work=$(realpath -m "$5")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$here/.venv/bin/python
[ -x "$python" ] || python=python3
mkdir -p "$work/one" && cd "$work" || exit 1  # python -m puts the working folder first on the path
first=$(find -L "$folder" -type f | sort | head -1)
ln -sf "$first" "$work/one/$(basename "$first")"
for round in 1 2; do
    for code in old new; do
        repo=$old
        [ "$code" = new ] && repo=$new
        for what in one all; do
            photos=$folder
            [ "$what" = one ] && photos=$work/one
            start=$(date +%s.%N)
            PYTHONPATH=$repo "$python" -m caltech_cli predict --config "$repo/configs/transfer.yaml" --ckpt_path "$ckpt" \
                --data.predict_dir "$photos" --data.tta_flip false --data.data_dir "$work/$code/data" \
                --trainer.logger false --trainer.enable_progress_bar false \
                --trainer.default_root_dir "$work/$code/$what" > "$work/$code-$what.log" 2>&1 || { tail -5 "$work/$code-$what.log"; exit 1; }
            end=$(date +%s.%N)
            rows=$(($(wc -l < "$work/$code/$what/predictions.csv") - 1))
            printf "round %s %s %s: %.1f s, %s images\n" "$round" "$code" "$what" "$(echo "$end - $start" | bc)" "$rows"
        done
    done
done
"$python" - "$work/old/all/predictions.csv" "$work/new/all/predictions.csv" <<'PY'
import csv, sys
old, new = (list(csv.DictReader(open(path, encoding="utf-8"))) for path in sys.argv[1:])
same = sum(a["class"] == b["class"] for a, b in zip(old, new))
gap = max(abs(float(a["probability"] or 0) - float(b["probability"] or 0)) for a, b in zip(old, new))
print(f"the same class for {same} of {len(old)} images; probabilities within {gap:.1e}")
PY
