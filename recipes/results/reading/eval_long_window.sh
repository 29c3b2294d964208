#!/usr/bin/env bash
# An adapter against the issue-25 bar: perplexity of the last 256 tokens of the window, adapter vs control (the adapter
# reading the next file: Austen <- PARI <- email <- Austen) vs the window alone, 2 stretches a file, the adapter's own
# walk (policy right), float32. Order: 8K, 16K, 4K (the bar is 8K and 16K).
# Usage (from the repository root):
#   SHAREDCTX_DATA=../shared/data bash recipes/results/reading/eval_long_window.sh [ADAPTER [NAME]]
# ADAPTER defaults to arm 4's (runs/reading-long-window/adapter), NAME (the JSON prefix) to long_window_quiet.
# Arm 4's run also measured the window alone at 16K and 4K; other arms score only the adapter and its control and take
# the window-alone figures from arm 4's JSON (the same stretches and base model: `bar_table.py --window-json`).
# THREADS (default 2) sets torch's threads.
set -euo pipefail
D=${SHAREDCTX_DATA:?set SHAREDCTX_DATA to the data folder}
A=${1:-runs/reading-long-window/adapter}
NAME=${2:-long_window_quiet}
R=recipes/results/reading
FILES=(--file "$D/books/pride_and_prejudice.txt" --file "$D/math/pari_usersch4.tex" --file "$D/code/cpython_email.py.txt")
COMMON=(--adapter "$A" --policy right --score-last 256 --windows 2 --control --threads "${THREADS:-2}" --json)
MODES=adapter
[ "$NAME" = long_window_quiet ] && MODES=adapter,window
# 8K: 4 chunks + 4,096; the window-alone figures are all_layers_mix_eval_ppl_8k_window.json (same stretches, base model)
sharedctx eval ppl "${FILES[@]}" "${COMMON[@]}" --total-length 8192 --window 4096 --modes adapter --out "$R/${NAME}_eval_ppl_8k.json" > /dev/null
# 16K: 12 chunks + 4,096
sharedctx eval ppl "${FILES[@]}" "${COMMON[@]}" --total-length 16384 --window 4096 --modes "$MODES" --out "$R/${NAME}_eval_ppl_16k.json" > /dev/null
# 4K: 2 chunks + 2,048 (a 4,096-token window leaves no context at 4K)
sharedctx eval ppl "${FILES[@]}" "${COMMON[@]}" --total-length 4096 --window 2048 --modes "$MODES" --out "$R/${NAME}_eval_ppl_4k.json" > /dev/null
