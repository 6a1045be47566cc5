#!/usr/bin/env bash
# Create one virtual environment per peer method, outside git, from PyPI.
#
#   bash benchmarks/peers/setup.sh                 # all peers
#   bash benchmarks/peers/setup.sh rctd tangram    # some
#
# Venvs go to ${SPOTLENS_PEERS_HOME:-$HOME/.cache/spotlens/peers}/<peer>/venv. A peer whose venv
# has the marker file .installed is skipped (idempotent); delete the venv folder to rebuild it.
# A failed peer leaves no marker and its log in <peer>/setup.log; the other peers still install.
# torch is pinned and installed FIRST (torch==2.13.0): an unpinned torch pulls the CUDA build
# (several GB). Set SPOTLENS_PEERS_TORCH to change the pin. cell2location 0.1.5 needs
# pyro-ppl 1.9.1: 1.9.2 removed pyro.infer.autoguide.utils.deep_getattr, which it imports.
# After the venvs exist, the RCTD likelihood table is computed once (rctd_table.py).
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HOME_DIR="${SPOTLENS_PEERS_HOME:-$HOME/.cache/spotlens/peers}"
PY="${SPOTLENS_PEERS_PYTHON:-python3}"
TORCH="${SPOTLENS_PEERS_TORCH:-torch==2.13.0}"
ALL=(nnls flashdeconv rctd tangram cell2location)
PEERS=("$@"); [ ${#PEERS[@]} -eq 0 ] && PEERS=("${ALL[@]}")

# What each peer's venv gets (besides the common anndata/pandas), torch first where needed.
packages() {
  case "$1" in
    nnls)          echo "numpy scipy" ;;
    flashdeconv)   echo "flashdeconv==0.2.0 numpy<2.4" ;;
    rctd)          echo "$TORCH | rctd-py==0.4.0" ;;
    tangram)       echo "$TORCH | tangram-sc scanpy" ;;
    cell2location) echo "$TORCH | cell2location==0.1.5 pyro-ppl==1.9.1" ;;
    *) return 1 ;;
  esac
}

status=0
for peer in "${PEERS[@]}"; do
  spec="$(packages "$peer")" || { echo "unknown peer: $peer (known: ${ALL[*]})" >&2; status=1; continue; }
  dir="$HOME_DIR/$peer"; venv="$dir/venv"; log="$dir/setup.log"
  if [ -f "$venv/.installed" ]; then echo "[$peer] exists: $venv"; continue; fi
  mkdir -p "$dir"; rm -rf "$venv"
  echo "[$peer] installing into $venv (log: $log)"
  {
    set -e
    "$PY" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    first="${spec%%|*}"; rest="${spec#*|}"
    if [ "$first" != "$spec" ]; then
      "$venv/bin/pip" install $first
      "$venv/bin/pip" install $rest anndata pandas
    else
      "$venv/bin/pip" install $spec anndata pandas
    fi
    "$venv/bin/pip" freeze > "$dir/requirements.lock"
  } > "$log" 2>&1 && touch "$venv/.installed" && echo "[$peer] ok" \
    || { echo "[$peer] FAILED, see $log"; tail -5 "$log"; status=1; }
done

# RCTD's Poisson-lognormal likelihood table, computed locally once (it would be downloaded).
if [ -f "$HOME_DIR/rctd/venv/.installed" ] && [ ! -f "$HOME_DIR/rctd/q_matrices.npz" ]; then
  echo "[rctd] computing likelihood table (once)"
  "$HOME_DIR/rctd/venv/bin/python" "$HERE/rctd_table.py" --out "$HOME_DIR/rctd" || status=1
fi
exit $status
