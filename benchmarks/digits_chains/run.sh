#!/bin/bash
# Digits (1x8x8, 10 classes): teacher resnet56 -> student resnet_d8_w0.5 directly, via one TA (resnet20,
# TAKD) and with DGKD; then the teacher-class network (4 students) flat and hierarchical (1 -> 2 -> 4).
# Three student seeds on one teacher. Usage: benchmarks/digits_chains/run.sh OUTDIR
# Prints the table of test top-1 (mean and sd over seeds). About 40 minutes on one CPU thread.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${1:?give an output folder}"
mkdir -p "$OUT" && cd "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
K="$PY -m recipes.cli"
[ -f T.pt ] || $K distill --preset "$HERE/teacher.yaml" --data digits -o T.pt -q
for s in 0 1 2; do
  common=(--teacher T.pt --student resnet_d8_w0.5 --method hinton --data digits --seed $s -q)
  $K distill "${common[@]}" -o direct_$s.pt > direct_$s.txt
  $K distill "${common[@]}" --chain resnet20 -o takd_$s.pt > takd_$s.txt
  $K distill "${common[@]}" --chain resnet20 --dgkd -o dgkd_$s.pt > dgkd_$s.txt
  $K distill --preset "$HERE/tcn_flat.yaml" --teacher T.pt --data digits --seed $s -o tcnflat_$s.pt -q > tcnflat_$s.txt
  $K distill --preset "$HERE/tcn_hier.yaml" --teacher T.pt --data digits --seed $s -o tcnhier_$s.pt -q > tcnhier_$s.txt
done
$PY - <<'PY'
import re, statistics as st
def acc(path, stage):
    for line in open(path):
        if line.startswith(stage + " "):
            return float(re.search(r"test top-1 ([\d.]+)%", line).group(1))
rows = [("direct", "direct", "student"), ("via TA (TAKD)", "takd", "student"), ("DGKD", "dgkd", "student"),
        ("TCN flat, 4 students", "tcnflat", "student"), ("TCN hier. level 1", "tcnhier", "tcn1"),
        ("TCN hier. level 2", "tcnhier", "tcn2"), ("TCN hier. level 4", "tcnhier", "tcn4")]
print(f"{'run':24s} {'seed 0':>7s} {'seed 1':>7s} {'seed 2':>7s} {'mean':>7s} {'sd':>5s}")
for label, prefix, stage in rows:
    v = [acc(f"{prefix}_{s}.txt", stage) for s in range(3)]
    print(f"{label:24s} " + " ".join(f"{a:7.2f}" for a in v) + f" {st.mean(v):7.2f} {st.stdev(v):5.2f}")
PY
