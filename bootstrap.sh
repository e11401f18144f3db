#!/usr/bin/env bash
# Relay's one-line set-up for a fresh notebook or machine.
#
#   bash bootstrap.sh                      install Relay from this checkout (or: bash bootstrap.sh PATH|GIT_URL;
#                                          a URL is cloned to $RELAY_DIR, default ~/relay, or updated if there)
#   bash bootstrap.sh --test               install with the test tools and run the test suite
#   bash bootstrap.sh --run PROFILE [relay train options]
#                                          install, then train (e.g. --run tiny, or
#                                          --run sdxl-naruto-t4 --storage gdrive://FOLDER_ID)
#
# It keeps a CUDA torch that the notebook already has (Colab, Kaggle): the installed torch,
# torchvision and torchaudio become pip constraints, so no dependency can replace them; it says
# what pip installed or upgraded. It installs the CPU build torch==2.13.0 only where no torch is
# importable and there is no NVIDIA GPU, and is idempotent: a second run in the same session checks
# a stamp and installs nothing.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
PIP=("$PYTHON" -m pip install --disable-pip-version-check --quiet)
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC="$HERE"
MODE=install
RUN_ARGS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --test) MODE=test; shift ;;
    --run)
      [[ $# -ge 2 ]] || { echo "bootstrap.sh: --run needs a profile, e.g. --run tiny" >&2; exit 2; }
      MODE=run; shift; RUN_ARGS=("--profile" "$1"); shift; RUN_ARGS+=("$@"); break ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "bootstrap.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) SRC="$1"; shift ;;
  esac
done

say() { printf '\033[1mrelay-bootstrap:\033[0m %s\n' "$*"; }

fetch_source() {
  if [[ -f "$SRC/pyproject.toml" ]]; then return; fi
  if [[ "$SRC" == http*://* || "$SRC" == git@* ]]; then
    local dest="${RELAY_DIR:-$HOME/relay}"
    if [[ -d "$dest/.git" ]]; then
      # a second run in the same VM: update the checkout (a local change keeps the checkout as it is)
      git -C "$dest" pull --ff-only --quiet || say "could not update $dest (local changes?); using it as it is"
    elif [[ -f "$dest/pyproject.toml" ]]; then
      say "using the Relay checkout already at $dest"
    elif [[ -e "$dest" && -n "$(ls -A "$dest" 2>/dev/null)" ]]; then
      echo "bootstrap.sh: $dest exists and is not a Relay checkout; move it away or set RELAY_DIR to another folder" >&2
      exit 2
    else
      git clone --quiet "$SRC" "$dest"
    fi
    SRC="$dest"
    return
  fi
  echo "bootstrap.sh: $SRC is neither a Relay checkout (no pyproject.toml) nor a git URL" >&2
  exit 2
}

ensure_torch() {
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    say "keeping the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    say "no torch found; installing the CUDA build"
    "${PIP[@]}" torch
  else
    say "no torch and no NVIDIA GPU; installing the CPU build torch==2.13.0"
    "${PIP[@]}" torch==2.13.0
  fi
}

# The platform's own torch family (Colab's and Kaggle's images ship CUDA builds): written as pip
# constraints, so resolving Relay's dependencies can never swap one for another build (gigabytes, and
# often a CUDA version the machine's driver does not match).
PLATFORM_PACKAGES=(torch torchvision torchaudio)

platform_constraints() {
  "$PYTHON" - "$1" "${PLATFORM_PACKAGES[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

pins = []
for name in sys.argv[2:]:
    try:
        pins.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
with open(sys.argv[1], "w") as f:
    f.write("".join(p + "\n" for p in pins))
print(" ".join(pins))
PY
}

installed_versions() {
  "$PYTHON" - <<'PY' | sort -u
from importlib.metadata import distributions

seen = set()
for dist in distributions():  # in sys.path order: the first of a name is the one that imports
    name = (dist.metadata["Name"] or "?").lower().replace("_", "-")
    if name not in seen:
        seen.add(name)
        print(name, dist.version)
PY
}

say_changes() {  # what pip changed, from two `installed_versions` listings
  local line name new old
  while read -r name new; do
    old="$(awk -v n="$name" '$1 == n {print $2; exit}' <<<"$1")"
    if [[ -z "$old" ]]; then
      line="installed $name $new"
    elif [[ "$(printf '%s\n%s\n' "$old" "$new" | sort -V | tail -n 1)" == "$new" ]]; then
      line="upgraded $name $old → $new"
    else
      line="downgraded $name $old → $new"
    fi
    say "$line"
  done < <(comm -13 <(printf '%s\n' "$1") <(printf '%s\n' "$2"))
}

install_relay() {
  local extras="$1" stamp key
  stamp="$SRC/.relay-bootstrap.stamp"
  key="$("$PYTHON" -c 'import sys; print(sys.executable)') $extras $(cksum <"$SRC/pyproject.toml")"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$key" ]] && "$PYTHON" -c "import runner, diffusers, peft" 2>/dev/null; then
    say "Relay is already installed (stamp $stamp); nothing to do"
    return
  fi
  ensure_torch
  local constraints pinned before
  constraints="$(mktemp)"
  pinned="$(platform_constraints "$constraints")"
  [[ -z "$pinned" ]] || say "keeping the platform's $pinned (pip constraints: never replaced)"
  before="$(installed_versions)"
  say "installing Relay from $SRC${extras:+ with [$extras]}"
  if ! "${PIP[@]}" -c "$constraints" -e "$SRC${extras:+[$extras]}"; then
    rm -f "$constraints"
    echo "bootstrap.sh: pip could not install Relay without replacing the platform's ${pinned:-packages};" \
      "Relay needs torch>=2.1 (pyproject.toml). Nothing of the platform's was changed." >&2
    exit 1
  fi
  rm -f "$constraints"
  say_changes "$before" "$(installed_versions)"
  echo "$key" >"$stamp"
}

fetch_source
case "$MODE" in
  install)
    install_relay ""
    # the hint is for a terminal; in a notebook cell (output not a terminal) the cell's next line trains
    if [[ -t 1 ]]; then say "done. Next: python -m runner train --profile tiny     (or: relay profiles)"; else say "done"; fi
    ;;
  test)
    install_relay "test"
    cd "$SRC"
    say "running the test suite"
    exec "$PYTHON" -m pytest -q
    ;;
  run)
    install_relay ""
    say "starting: relay train ${RUN_ARGS[*]}"
    exec "$PYTHON" -m runner train "${RUN_ARGS[@]}"
    ;;
esac
