#!/bin/sh
# The Flora paper's two experiments (momentum, gradient accumulation) in JAX, as the reference
# README's `sh replicate.sh`: see docs/replication.md. Extra arguments go to the command, e.g.
#   sh replicate.sh --quick --out /tmp/rep
# Needs: pip install -e lab 'flora-opt[replicate]'   (or: make setup)
set -e
cd "$(dirname "$0")"
if [ -x .venv/bin/flora-opt ]; then FLORA_OPT=.venv/bin/flora-opt; else FLORA_OPT=flora-opt; fi
exec "$FLORA_OPT" replicate all --out benchmarks/results/replicate "$@"
