#!/bin/sh
# The Flora paper's two experiments (momentum, gradient accumulation) in JAX, as the reference
# README's `sh replicate.sh`: see docs/replication.md. Extra arguments go to the command, e.g.
#   sh replicate.sh --quick --out /tmp/rep
# Needs: pip install -e . -e 'lab[replicate]'   (or: make setup)
set -e
cd "$(dirname "$0")"
if [ -x .venv/bin/flora-lab ]; then FLORA_LAB=.venv/bin/flora-lab; else FLORA_LAB=flora-lab; fi
exec "$FLORA_LAB" replicate all --out benchmarks/results/replicate "$@"
