# shellcheck shell=bash
# Debian packages a script needs, installed only when missing (test.sh, build-node.sh), so the
# check and the quiet, sudo-if-needed install are said once.
#
#   source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/apt.sh"
#   apt_install_missing LOGFN COMMAND:PACKAGE…

# Install the PACKAGE of every COMMAND found neither on PATH nor in /usr/sbin (iptables and nft
# live there, off a user's PATH); LOGFN (the caller's log or say) says which before installing.
apt_install_missing() {
  local logfn=$1 pair
  local missing=()
  shift
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || missing+=("${pair#*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    "$logfn" "installing Debian packages: ${missing[*]}"
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}
