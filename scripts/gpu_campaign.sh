#!/usr/bin/env bash
# The GPU campaign (scripts/gpu_campaign.py): install, check, tune, bench, report, e2e,
# sanitize or all; --out DIR gets gpu-results.tar.gz; --rehearse runs it all on CPU.
#   scripts/gpu_campaign.sh check --out "$OUT"      # one step per GPU command
#   scripts/gpu_campaign.sh all --rehearse          # the whole pipeline on CPU
# Python: $PYTHON, else this checkout's .venv, else python3.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
exec "$PYTHON" "$root/scripts/gpu_campaign.py" "$@"
