#!/usr/bin/env bash
# One bounded command for a lent GPU: correctness, the target table, training steps, the per-kernel
# breakdown, the training loop's speed (bench/train_speed.py), results under bench/results/<gpu>-<date>/
# and the README's results table regenerated from them, in under 9 minutes (every step has its own
# time limit). Without a GPU it runs the CPU smoke parts in under two minutes and says so.
#
#   bash bench/gpu_session.sh [--out DIR] [--list] [--steps NAME,...]   # details: python -m bench.session --help
#
# Uses this machine's own python / torch / triton; installs nothing (the checkout goes on PYTHONPATH).
# PYTHON=... picks the interpreter; an outer limit (BLOCKDPR_SESSION_LIMIT_S, default 540 s) is a last guard.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --kill-after=10 "${BLOCKDPR_SESSION_LIMIT_S:-540}" "${PYTHON:-python}" -m bench.session "$@"
