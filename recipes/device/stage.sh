#!/usr/bin/env bash
# Stage a GPU session (recipes/device/README.md): the default model in two halves (../shared/device/prepare.sh),
# the training corpus as token shards split by file as the recipe says ($RECIPE, default recipes/smollm2-gpu.toml)
# and the held-out texts, compressed, under the git-ignored .device/a/.
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
from sharedctx.data import build_shards
from sharedctx.models import default_model_path
from sharedctx.train import load_recipe

work, recipe = Path(sys.argv[1]), load_recipe(sys.argv[2])
data = Path("..").resolve() / "shared" / "data"
tok = AutoTokenizer.from_pretrained(str(default_model_path()))
build_shards([data], tok, work / "shards", holdout=list(recipe.holdout))  # the recipe's split by file
(work / "heldout").mkdir()
for name in recipe.holdout:
    shutil.copy(data / name, work / "heldout" / Path(name).name)
print("held out:", list(recipe.holdout))
PYTHON
tar -C "$work" -cJf .device/a/shards.tar.xz shards
tar -C "$work" -cJf .device/a/heldout.tar.xz heldout
du -sh .device/a .device/b
echo "working tree that travels with run 1: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes + .device/a"
