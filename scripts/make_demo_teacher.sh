#!/usr/bin/env bash
# Make the shipped demo teacher, facd_fast/checkpoints/edsr-demo-teacher-x2.pth, and its record (.json):
#
#   scripts/make_demo_teacher.sh
#
# 1. fetches the 88 training photographs (scripts/fetch_train_photos.sh -> datasets/train-photos;
#    sources and licences in docs/data.md);
# 2. makes datasets/teacher-photos: links to those and to the 8 built-in training photos;
# 3. trains the teacher: facd train-teacher demo-teacher (facd_fast/configs/demo-teacher.toml);
# 4. copies its export into the package and writes the record beside it (the command, steps, time,
#    machine, validation PSNR and sha256).
# Needs network access to a Debian mirror and about an hour of one CPU core with AMX or AVX512-BF16
# (bf16 training); not a dependency of `make test` or `make demo`. --resume continues a killed run.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
resume=()
[ "${1:-}" = "--resume" ] && resume=(--resume)

[ -f datasets/train-photos/MANIFEST.tsv ] || bash scripts/fetch_train_photos.sh datasets/train-photos
"$python" - <<'PY'
from pathlib import Path
from facd_fast.data import write_builtin_photos

train, _ = write_builtin_photos("datasets/builtin")
folder = Path("datasets/teacher-photos")
folder.mkdir(parents=True, exist_ok=True)
sources = sorted(Path("datasets/train-photos").glob("*.png")) + sorted(Path(train).glob("*.png"))
for source in sources:
    link = folder / (("builtin-" if source.parent == Path(train) else "") + source.name)
    if not link.exists():
        link.symlink_to(source.resolve())
print(f"datasets/teacher-photos: {len(sources)} photos")
PY
started=$(date +%s)
"$python" -m facd_fast train-teacher demo-teacher "${resume[@]}"
"$python" - "$started" <<'PY'
import hashlib, json, platform, shutil, sys, time
from pathlib import Path
import torch
from facd_fast.bench.train_step import cpu_name
from facd_fast.train.run_log import read_log

run = Path("runs/demo-teacher/teacher")
end = list(read_log(run / "log.jsonl", "end"))[-1]
target = Path("facd_fast/checkpoints/edsr-demo-teacher-x2.pth")
shutil.copyfile(run / "teacher.pth", target)
record = {
    "command": "scripts/make_demo_teacher.sh (facd train-teacher demo-teacher)",
    "preset": "edsr-demo-teacher", "scale": 2, "steps": end["steps"], "elapsed_s": round(end["elapsed_s"], 1),
    "wall_s": round(time.time() - float(sys.argv[1]), 1), "val_psnr_y_centre_crops": round(end["val_psnr_y"], 3),
    "training_photos": len(list(Path("datasets/teacher-photos").glob("*.png"))),
    "machine": f"{cpu_name()}, torch {torch.__version__}, python {platform.python_version()}, 1 thread",
    "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
}
target.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
print(json.dumps(record, indent=2))
PY
