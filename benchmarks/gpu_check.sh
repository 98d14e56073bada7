#!/usr/bin/env bash
# Run benchmarks/gpu_check.py from this working tree, on any machine, without installing anything system-wide.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options]      # PYTHON=... picks the interpreter (default: python3)
#
# When `import hf_neuralcache.kernels` fails (a machine without our venv, like the GPU machine), the wheels in .whl/
# (`make gpu-wheels`: the dependencies that machine lacks) and the package itself are installed into a throwaway
# folder ($GPU_CHECK_SITE, default /tmp/hf_neuralcache_site) put first on PYTHONPATH: no index, no network, no
# dependencies. The results go to benchmarks/out/gpu/, and also to $OUT when it is set (the device machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/hf_neuralcache_site}

# -P keeps the working directory off sys.path: the repo root's hf_neuralcache/ lacks its kernels subpackage
if ! "$PYTHON" -P -c "import hf_neuralcache.kernels" 2>/dev/null; then
    echo "hf_neuralcache is not importable by $PYTHON: installing .whl/*.whl and this tree into $SITE"
    shopt -s nullglob
    wheels=(.whl/*.whl)
    rm -rf "$SITE" build
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
        --target "$SITE" "${wheels[@]}" . ; then
        # no usable setuptools: lay the package out as pyproject.toml's package-dir does
        echo "pip could not build this tree; copying it instead (kernels/ becomes hf_neuralcache/kernels)"
        rm -rf "$SITE"
        if [ ${#wheels[@]} -gt 0 ]; then
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${wheels[@]}"
        fi
        mkdir -p "$SITE"
        cp -r hf_neuralcache "$SITE/hf_neuralcache"
        cp -r kernels "$SITE/hf_neuralcache/kernels"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    "$PYTHON" -P -c "import hf_neuralcache.kernels, hf_neuralcache; print('hf_neuralcache from', hf_neuralcache.__file__)"
fi

extra=()
if [ -n "${OUT:-}" ]; then
    extra=(--copy-to "$OUT")
fi
exec "$PYTHON" benchmarks/gpu_check.py "${extra[@]}" "$@"
