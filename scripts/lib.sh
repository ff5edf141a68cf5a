# Shared by scripts/run.sh and scripts/test.sh: build prerequisites and the cargo
# target directory (outside the clone, so CI and later runs reuse the build).

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/stream-relay/target}"

# Installs the Debian packages named, when any of their commands is missing.
# Usage: need_packages "cmd:package" ...
need_packages() {
  local missing=()
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing: ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Pingora builds a compression library with cmake, and ring needs a C compiler.
need_build_tools() {
  need_packages cmake:cmake cc:gcc
}
