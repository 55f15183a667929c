#!/bin/bash
# Every benchmark on this machine, one after the other, most telling first; each one's output goes
# to OUT/<name>.txt as well as to the screen, and a step that fails or runs out of time does not stop
# the rest. On a GPU machine with little time, the first three answer most questions.
#
#   bash benchmarks/all.sh SOURCE OUT [cpu|gpu] [SECONDS_PER_STEP]
#   bash benchmarks/all.sh /tmp/caltech34 /tmp/bench gpu          # a folder of class folders
set -u
source=$(realpath "$1") out=$(realpath -m "$2") accelerator=${3:-cpu} limit=${4:-300}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=$(mktemp -d /tmp/caltech-bench-XXXXXX)
mkdir -p "$out"
step() {  # step NAME ARGS...: one benchmark under a time limit
    local name=$1
    shift
    echo "== $name: $*" | tee "$out/$name.txt"
    timeout "$limit" python3 "$here/$name.py" "$@" 2>&1 | tee -a "$out/$name.txt" | grep -v "^\s*$" | tail -12
    echo "== $name exit ${PIPESTATUS[0]}" | tee -a "$out/$name.txt"
}
step device_setup --accelerator "$accelerator"
floor=()
[ "$accelerator" = gpu ] && floor=(--floor-batch 64)  # the plain loop at its best batch on a GPU, as the issue ran it
step fit --source "$source" --accelerator "$accelerator" "${floor[@]}" --workdir "$work/fit"
step predict --ckpt "$work/fit/runs/cached/best.ckpt" --folder "$source" --limit 5000 --accelerator "$accelerator"
step head_epochs --accelerator "$accelerator"
step finetune --source "$source" --accelerator "$accelerator" --workdir "$work/finetune"
step startup --source "$source" --repeat 2
rm -rf "$work"
