# Sourced by scripts/node, scripts/test, scripts/bench, scripts/soak.
# Creates .venv at the repo root on first use and (re)installs the project only when
# pyproject.toml or the C source changed, so a second start costs no pip call.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

bootstrap_venv() {
    local extras="${1:-}"
    local want
    # What the install builds from: a change to any of these reinstalls (and recompiles).
    want="$(cat "$ROOT/pyproject.toml" "$ROOT"/shard/*.c "$ROOT"/node/*.c | sha256sum | cut -d' ' -f1)"
    # Fast path (every start after the first): no lock, no pip.
    if _venv_current "$extras" "$want"; then return 0; fi
    # Several scripts may start at once on a fresh clone (tests start nodes in parallel):
    # one installs, the others wait for it and then find the stamp current.
    mkdir -p "$VENV"
    exec 9>"$VENV/.bootstrap.lock"
    flock 9
    if ! _venv_current "$extras" "$want"; then
        if [ ! -x "$PY" ]; then
            echo "[bootstrap] creating $VENV" >&2
            python3 -m venv "$VENV"
        fi
        echo "[bootstrap] installing shardkv${extras:+[$extras]} into .venv" >&2
        "$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT${extras:+[$extras]}" >&2
        echo "$want" > "$VENV/.shardkv-installed${extras:+-$extras}"
    fi
    flock -u 9
    exec 9>&-
}

# True when .venv has the project installed for this pyproject.toml. An install with
# extras (e.g. [test]) also covers the plain install, so scripts/node after scripts/test
# needs no pip call.
_venv_current() {
    local extras="$1" want="$2" stamp
    [ -x "$PY" ] || return 1
    if [ -n "$extras" ]; then
        stamp="$VENV/.shardkv-installed-$extras"
        [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]
        return
    fi
    for stamp in "$VENV"/.shardkv-installed*; do
        if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
    done
    return 1
}

# Installs Debian packages only when a command is missing (root, as on CI).
ensure_debian_package() {
    local cmd="$1" pkg="$2"
    if command -v "$cmd" >/dev/null 2>&1; then return 0; fi
    echo "[bootstrap] installing Debian package $pkg (for $cmd)" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$pkg" >&2
    # Debian starts the packaged service; our tests run their own instances.
    $sudo systemctl stop "$pkg" >/dev/null 2>&1 || true
    $sudo service "$pkg" stop >/dev/null 2>&1 || true
}
