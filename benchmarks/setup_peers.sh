#!/usr/bin/env bash
# Create (or bring up to date) the two virtual environments the peer benchmarks use:
#
#   $FLORA_PEERS_VENV (default /work/venv-peers): torch==2.13.0 (CPU), transformers, accelerate,
#       peft, galore-torch, apollo-torch, bitsandbytes, torchao -- benchmarks/peers/requirements-peers.txt
#   $FLORA_REF_VENV   (default /work/venv-ref):   torch==2.13.0 (CPU) + the reference
#       flora-opt==0.0.3 and the modules it imports -- benchmarks/peers/requirements-ref.txt
#
# The reference package has the same import name (flora_opt) as this repository, so it gets its
# own venv and this repo is never installed there. Both locks were verified to install and step
# on CPU (benchmarks/peers/README.md).
#
# Usage: benchmarks/setup_peers.sh [peers|ref|all] [--check] [--force]
#   --check   afterwards run the smoke test (a few steps of every contender + ref_worker)
#   --force   reinstall even if the venv's stamp says it is up to date
# Env: FLORA_PEERS_VENV, FLORA_REF_VENV, FLORA_PEERS_PYTHON (interpreter used to create the
#      venvs, default python3; 3.11 verified), FLORA_TORCH_SPEC (default torch==2.13.0).
#
# Idempotent: a venv whose stamp matches the lock file is left alone; otherwise pip brings it
# to the lock (torch first, always pinned, so pip never swaps in a CUDA build).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
PEERS_VENV="${FLORA_PEERS_VENV:-/work/venv-peers}"
REF_VENV="${FLORA_REF_VENV:-/work/venv-ref}"
PY="${FLORA_PEERS_PYTHON:-python3}"
TORCH_SPEC="${FLORA_TORCH_SPEC:-torch==2.13.0}"

what="all"
check=0
force=0
for arg in "$@"; do
  case "$arg" in
    peers|ref|all) what="$arg" ;;
    --check) check=1 ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { echo "[setup_peers] $*" >&2; }

"$PY" - <<'EOF' || { echo "[setup_peers] need Python >= 3.10 (set FLORA_PEERS_PYTHON)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
EOF

# make_venv DIR LOCKFILE
make_venv() {
  local dir="$1" lock="$2"
  local stamp="$dir/.flora-setup-stamp"
  local want
  want="$(cat "$lock"; echo "$TORCH_SPEC"; "$PY" -c 'import sys; print(sys.version.split()[0])')"
  want="$(printf '%s' "$want" | sha256sum | cut -d' ' -f1)"
  if [[ $force -eq 0 && -x "$dir/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    log "$dir is up to date ($(basename "$lock"))"
    return 0
  fi
  if [[ ! -x "$dir/bin/python" ]]; then
    log "creating $dir with $("$PY" --version 2>&1)"
    "$PY" -m venv "$dir"
  fi
  local pip=("$dir/bin/python" -m pip --disable-pip-version-check)
  local cons
  cons="$(mktemp)"
  echo "$TORCH_SPEC" > "$cons"
  # torch first, alone: the CPU wheel (local on the project's machines).
  log "$dir: installing $TORCH_SPEC"
  "${pip[@]}" install -q -c "$cons" "$TORCH_SPEC"
  # then the verified lock, torch pinned again through the constraint.
  log "$dir: installing $(basename "$lock")"
  "${pip[@]}" install -q -c "$cons" -r "$lock"
  rm -f "$cons"
  "$dir/bin/python" - "$TORCH_SPEC" <<'EOF'
import sys, torch
spec = sys.argv[1]
want = spec.split("==", 1)[1] if "==" in spec else None
have = torch.__version__.split("+")[0]
if want and have != want:
    sys.exit(f"[setup_peers] torch {torch.__version__} installed, expected {want}")
print(f"[setup_peers] torch {torch.__version__}, cuda={torch.version.cuda}", file=sys.stderr)
EOF
  echo "$want" > "$stamp"
}

if [[ "$what" == "peers" || "$what" == "all" ]]; then
  make_venv "$PEERS_VENV" "$HERE/peers/requirements-peers.txt"
  (cd / && env -u PYTHONPATH "$PEERS_VENV/bin/python" -c "import flora_opt" >/dev/null 2>&1) && {
    log "WARNING: flora_opt is importable in $PEERS_VENV outside this repo; the peers venv should not" \
        "contain the reference package (run benchmarks from the repo root so flora_opt is this repo's)"
  } || true
fi
if [[ "$what" == "ref" || "$what" == "all" ]]; then
  make_venv "$REF_VENV" "$HERE/peers/requirements-ref.txt"
  (cd / && env -u PYTHONPATH "$REF_VENV/bin/python" - <<'EOF'
import importlib.metadata, sys
import flora_opt
v = importlib.metadata.version("flora-opt")
if v != "0.0.3" or flora_opt.Flora is None:
    sys.exit(f"[setup_peers] reference flora_opt broken: version {v}, Flora={flora_opt.Flora}")
print(f"[setup_peers] reference flora-opt {v} at {flora_opt.__file__}", file=sys.stderr)
EOF
  ) 2> >(grep -v "gemm_4bit_forward" >&2)
fi

if [[ $check -eq 1 ]]; then
  log "smoke test"
  cd "$REPO"
  env FLORA_PEERS_VENV="$PEERS_VENV" FLORA_REF_VENV="$REF_VENV" \
    "$PEERS_VENV/bin/python" -m benchmarks.peers.smoke --ref-worker --formulas
fi
log "done: FLORA_PEERS_VENV=$PEERS_VENV FLORA_REF_VENV=$REF_VENV"
