#!/usr/bin/env bash
# Every GPU figure of the project in one call, planned to finish in under 8 minutes, install included:
# training throughput and MFU (qalign's GRPO vs TRL's GRPO, ShiQ/DQO vs TRL's SFT), GRPO step time with HF /
# vLLM / vLLM + asynchronous rollouts, one-GPU ZeRO-2 / ZeRO-3 / ZeRO-3 offload in bf16, and the Q#
# guided-decoding ratio. bench/gpu_suite.py is the driver: its docstring says what each measurement runs, and
# `--list` prints each one's time budget.
#
#   bash bench/gpu_suite.sh                                  # GPU: a dated section appended to docs/gpu_results.md
#   bash bench/gpu_suite.sh --cpu-smoke [--out FILE.md]      # CPU: the same code paths on tiny shapes (CI runs it)
#   bash bench/gpu_suite.sh --results-dir "$OUT"             # results.json, section.md, logs.tar.gz land there
#
# Any other option goes to the driver (python bench/gpu_suite.py --help: --only, --skip, --model, ...).
#
# Environment:
#   QALIGN_WHEELS     folders of carried wheels, separated by ':', installed first with
#                     `pip install --no-index --find-links DIR --no-deps --target $QALIGN_SITE DIR/*.whl`
#                     (nothing is fetched). A folder holding a vLLM wheel bundle split into parts
#                     (one tar of wheels cut into part_00, part_01, ... or part_NN/part_NN) is
#                     joined and unpacked first. A second run with the same wheels skips the install.
#   QALIGN_SITE       where they go (default /tmp/qalign-site); it is put first on PYTHONPATH
#   QALIGN_PYTHON     interpreter (default: .venv/bin/python when present, else python3)
#   QALIGN_TOKENIZER  tokenizer folder for the GPU model (default: the cached SmolLM2 tokenizer, else the tests'
#                     tiny one)
set -euo pipefail

started=$(date +%s.%N)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

for arg in "$@"; do
  case "$arg" in
    -h|--help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
      exit 0
      ;;
  esac
done

python=${QALIGN_PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=$repo/.venv/bin/python; else python=python3; fi
fi

install_seconds=0
seconds_since() { awk -v now="$(date +%s.%N)" -v then="$1" 'BEGIN { printf "%.1f", now - then }'; }

if [ -n "${QALIGN_WHEELS:-}" ]; then
  t0=$(date +%s.%N)
  site=${QALIGN_SITE:-/tmp/qalign-site}
  mkdir -p "$site"
  wheels=()
  IFS=':' read -r -a folders <<< "$QALIGN_WHEELS"
  for folder in "${folders[@]}"; do
    [ -d "$folder" ] || { echo "QALIGN_WHEELS: no folder $folder" >&2; exit 2; }
    parts=$(find "$folder" -maxdepth 2 -type f -name 'part_[0-9]*' | sort)
    if [ -n "$parts" ]; then  # the split vLLM bundle: one tar of wheels
      unpacked="$site.bundle/$(echo "$folder" | md5sum | cut -c1-8)"
      if [ ! -e "$unpacked/.done" ]; then
        rm -rf "$unpacked" && mkdir -p "$unpacked"
        # shellcheck disable=SC2086
        cat $parts | tar x -C "$unpacked"
        touch "$unpacked/.done"
      fi
      folder=$unpacked
    fi
    for wheel in "$folder"/*.whl; do
      [ -e "$wheel" ] && wheels+=("$wheel")
    done
  done
  [ "${#wheels[@]}" -gt 0 ] || { echo "QALIGN_WHEELS: no .whl files in $QALIGN_WHEELS" >&2; exit 2; }
  stamp=$(for wheel in "${wheels[@]}"; do basename "$wheel"; done | sort | md5sum | cut -c1-32)
  if [ "$(cat "$site/.qalign-wheels" 2>/dev/null)" != "$stamp" ]; then
    links=()
    for folder in "${folders[@]}"; do links+=(--find-links "$folder"); done
    "$python" -m pip install -q --no-index "${links[@]}" --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "${wheels[@]}"
    echo "$stamp" > "$site/.qalign-wheels"
    echo "installed ${#wheels[@]} wheels into $site"
  else
    echo "the ${#wheels[@]} wheels of QALIGN_WHEELS are already installed in $site"
  fi
  install_seconds=$(seconds_since "$t0")
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

exec "$python" bench/gpu_suite.py --python "$python" --started-at "$started" --install-seconds "$install_seconds" "$@"
