# shellcheck shell=bash
# Sourced by the install scripts that need a Python virtualenv.
# make_venv DIR: creates DIR as a venv unless it already has a python; installs Debian's
# python3-venv first where the system python3 ships without it.
make_venv() {
    local dir=$1
    [ -x "$dir/bin/python" ] && return 0
    if ! python3 -m venv "$dir" 2>/dev/null; then
        # Debian's own python3 ships venv separately.
        apt-get update -qq
        apt-get install -y -qq python3-venv >/dev/null
        rm -rf "$dir"
        python3 -m venv "$dir"
    fi
}
