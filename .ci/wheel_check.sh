#!/usr/bin/env bash
# Packaging check (CI): build the sdist and wheel, install the wheel (not editable) into a fresh venv, and run what
# a new user runs, from a directory outside the checkout: `posttrain recipes`, `--dry-run` of every shipped recipe
# (0, or 3 = valid but not runnable on this machine: vLLM/GPU recipes, POLAR data an earlier step writes) and a
# shortened `posttrain quickstart`, and a `--rehearse`.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=$(mktemp -d)
python -m pip install -q build
python -m build -q --outdir "$WORK/dist" . >/dev/null
ls "$WORK/dist"
python -m tarfile -l "$WORK"/dist/posttrain-*.tar.gz > "$WORK/sdist.txt"
python -m zipfile -l "$WORK"/dist/posttrain-*.whl > "$WORK/wheel.txt"
grep "recipes/sft/arithmetic.yaml" "$WORK/sdist.txt" > /dev/null
grep "posttrain/_shipped/eval/suites/arithmetic.yaml" "$WORK/wheel.txt" > /dev/null
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q torch==2.13.0
"$WORK/venv/bin/pip" install -q "$WORK"/dist/posttrain-*.whl
mkdir -p "$WORK/outside" && cd "$WORK/outside"
PT="$WORK/venv/bin/posttrain"
"$PT" recipes > recipes.txt
n=$(wc -l < recipes.txt)
echo "posttrain recipes: $n recipes listed from the wheel"
[ "$n" -ge 10 ]
# Every shipped recipe's `posttrain train recipes/NAME --dry-run`, through the CLI's own entry point, in one process
# (a process per recipe spent ~8 s each importing torch and TRL).
"$WORK/venv/bin/python" - <<'PY'
import contextlib, io, sys
from posttrain.cli import main
for line in open("recipes.txt"):
    name = line.split()[0]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(["train", f"recipes/{name}", "--dry-run"])
    if rc not in (0, 3):
        sys.exit(f"dry-run of shipped recipe {name} failed (rc {rc}):\n{err.getvalue()}")
    print(f"dry-run recipes/{name}: rc {rc}")
PY
"$PT" quickstart --out qs --set training.max_steps=3 --set eval.limit=16 > qs.txt
grep -q "report:" qs.txt && test -f qs/report.md
echo "quickstart from the wheel: ok"
# A GPU recipe rehearsed from the wheel: 2 CPU processes; this venv has no DeepSpeed, so DDP stands in, and says so.
"$PT" train recipes/nft/qwen2.5-math-7b.yaml --rehearse --rehearse-dir reh > reh.txt
grep -q "rehearsal passed" reh.txt && test -f reh/run/final/posttrain_final.json
grep -q "DeepSpeed ZeRO-2 (not installed here" reh.txt
echo "rehearsal from the wheel: ok"
cd "$REPO" && rm -rf "$WORK"
