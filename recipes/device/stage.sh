#!/usr/bin/env bash
# Stage a GPU session (recipes/device/README.md): the default model in two halves (../shared/device/prepare.sh),
# the training corpus as token shards split by file as the recipe says ($RECIPE, default recipes/smollm2-gpu.toml)
# and the held-out texts, compressed, under the git-ignored .device/b/ (run 2 has more room: each run's working
# tree, with the folder it carries, must stay under 64 MiB).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
PY=${PY:-.venv/bin/python}
bash ../shared/device/prepare.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
RECIPE=${RECIPE:-recipes/smollm2-gpu.toml}
"$PY" - "$work" "$RECIPE" <<'PYTHON'
import shutil, sys
from pathlib import Path
from transformers import AutoTokenizer
from sharedctx.training.data import build_shards
from sharedctx.base_model import default_model_path
from sharedctx.training.trainer import load_recipe

work, recipe = Path(sys.argv[1]), load_recipe(sys.argv[2])
data = Path("..").resolve() / "shared" / "data"
tok = AutoTokenizer.from_pretrained(str(default_model_path()))
build_shards([data], tok, work / "shards", holdout=list(recipe.holdout))  # the recipe's split by file
(work / "heldout").mkdir()
for name in recipe.holdout:
    shutil.copy(data / name, work / "heldout" / Path(name).name)
print("held out:", list(recipe.holdout))
PYTHON
rm -f .device/a/shards.tar.xz .device/a/heldout.tar.xz
tar -C "$work" -cJf .device/b/shards.tar.xz shards
tar -C "$work" -cJf .device/b/heldout.tar.xz heldout
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
for run in a b; do
  total=$(( tree + $(du -cb .device/$run | tail -1 | cut -f1) ))
  echo "run with .device/$run: $(( total / 1048576 )) MiB of the 64 MiB a run may take"
  [ "$total" -lt 67108864 ] || { echo "too large for one run: move something out of .device/$run" >&2; exit 1; }
done
