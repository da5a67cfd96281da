#!/usr/bin/env bash
# The GPU check: on a fresh GPU machine with CuPy and torch preinstalled and no network, run
# the GPU tests and the GPU benchmark in under 5 minutes, writing every result into one folder.
#
#   bash bench/gpu_check.sh [--dry-run] [OUTDIR]
#
# OUTDIR defaults to $OUT if set, else bench/results/gpu-<date>-<card>. OPTIM_CORE_COMMIT, if
# set, is recorded as the commit (a device's copy of the tree may carry a stale .git). The project need not
# be installed: the script builds a throwaway import path (optim_core with backends/ inside it
# as optim_core.backends) and installs array-api-compat / array-api-strict from bench/wheels
# into it when the machine lacks them. --dry-run (or no GPU) skips the GPU parts and checks
# the plumbing instead: imports, test selection, and a tiny CPU benchmark.
#
# Files written (at most 8, so all of them come back from a device run):
#   environment.txt  what is installed, nvidia-smi, git commit
#   pytest-gpu.log   the GPU tests (CuPy-parametrized tests and those using the gpu fixture)
#   bench-gpu.json   the benchmark's full results;  bench-gpu.md  its table and targets
#   bench-gpu.log    the benchmark's progress output, then bench/gpu_plans.py's table (the
#                    default path's step plans vs torch fused) and its target lines
#   cuda-tuning.json, cuda-tuning.md  the launch-configuration sweep (bench/cuda_tuning.py)
#   summary.txt      card, date, each part's exit status, the targets
set -uo pipefail

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
START=$(date +%s)
# Seconds for each part; together well under 5 minutes. The benchmark starts no new cell
# after BENCH_LIMIT seconds, and on the timeout's SIGTERM it still writes what it measured.
# On an H200 (2026-11-26) the tests took 38 s, the sweep about 17 s, the benchmark about
# 180 s, a third of it XLA compiling optax for the 1000-tensor workload.
TEST_TIMEOUT=${TEST_TIMEOUT:-60}
TUNING_TIMEOUT=${TUNING_TIMEOUT:-35}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-200}
BENCH_LIMIT=${BENCH_LIMIT:-185}
PLANS_TIMEOUT=${PLANS_TIMEOUT:-60}  # bench.gpu_plans: 3 workloads x 4 kinds x 7 rounds
BENCH_BUDGET=${BENCH_BUDGET:-0.1}   # seconds of timed repeats per cell
BENCH_ARGS=${BENCH_ARGS:-}          # e.g. "--optimizers adam --workloads resnet50"

if [ "$DRY_RUN" = 0 ] && ! nvidia-smi -L >/dev/null 2>&1; then
    echo "no GPU found (nvidia-smi -L failed): running as --dry-run"
    DRY_RUN=1
fi
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
CARD=${CARD:-no-gpu}
SLUG=$(echo "$CARD" | tr -cs 'A-Za-z0-9' '-' | sed 's/^-*//; s/-*$//')
OUTDIR=${1:-${OUT:-$ROOT/bench/results/gpu-$(date -u +%Y-%m-%d)-$SLUG}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/optim-core-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
echo "optim-core GPU check: card '$CARD', results in $OUTDIR, dry run: $DRY_RUN"

# --- 1. A throwaway import path: optim_core with backends/ inside, bench/, a test selector.
mkdir -p "$WORK/path" "$WORK/site"
cp -r "$ROOT/optim_core" "$WORK/path/optim_core"
rm -rf "$WORK/path/optim_core/backends"
cp -r "$ROOT/backends" "$WORK/path/optim_core/backends"
cp -r "$ROOT/bench" "$WORK/path/bench"
find "$WORK/path" -name __pycache__ -prune -exec rm -rf {} +
cat >"$WORK/path/gpu_select.py" <<'EOF'
"""pytest plugin: keep only GPU tests (a cupy/cuda/gpu parameter or test name, or the gpu
fixture). The test's own name and parameters are matched, not its file's: the host-emulation
tests of test_*cuda*.py files need no GPU and run in CI."""


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        text = item.name.lower()
        is_gpu = "gpu" in names or any(word in text for word in ("cupy", "cuda", "gpu"))
        (keep if is_gpu else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
EOF
export PYTHONPATH="$WORK/path:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# JAX would otherwise take 75% of the GPU's memory at start, starving CuPy and torch.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
cd "$WORK/path" || exit 1  # never the repository root: its optim_core/ has no backends/

have() { "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
for pair in array_api_compat:array_api_compat array_api_strict:array_api_strict; do
    module=${pair%%:*}; wheel=${pair##*:}
    if ! have "$module"; then
        echo "installing $module from bench/wheels (offline)"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" \
            "$ROOT"/bench/wheels/"$wheel"-*.whl || echo "could not install $module"
    fi
done

# --- 2. What is here.
{
    echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "card: $CARD"
    echo "host: $(hostname)  cpus: $(nproc)  load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
    # A copied working tree may carry a stale .git: the caller can name the commit.
    if [ -n "${OPTIM_CORE_COMMIT:-}" ]; then
        echo "commit: $OPTIM_CORE_COMMIT (given by the caller)"
    else
        echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)" \
             "$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . \
                && echo '(with local changes)')"
    fi
    echo "python: $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON")"
    "$PYTHON" - <<'EOF'
import importlib.metadata as md
import importlib.util

for module, dists in [("numpy", ["numpy"]), ("cupy", ["cupy-cuda13x", "cupy-cuda12x", "cupy"]),
                      ("torch", ["torch"]), ("jax", ["jax"]), ("optax", ["optax"]),
                      ("numba", ["numba"]), ("array_api_compat", ["array-api-compat"]),
                      ("array_api_strict", ["array-api-strict"]), ("pytest", ["pytest"]),
                      ("hypothesis", ["hypothesis"])]:
    version = None
    for dist in dists:
        try:
            version = md.version(dist)
            break
        except md.PackageNotFoundError:
            pass
    present = importlib.util.find_spec(module) is not None
    print(f"  {module:<17} {version or ('present' if present else 'MISSING')}")
EOF
    "$PYTHON" -c "import optim_core, optim_core.backends; print('optim_core from', optim_core.__file__)"
    echo
    if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1; else echo "nvidia-smi: not found"; fi
} 2>&1 | tee "$OUTDIR/environment.txt"

# --- 3. The GPU tests.
# Only files that mention a GPU or take the xp fixture (which has a cupy parameter) are
# collected: collecting the whole suite takes a while.
mapfile -t TEST_FILES < <(grep -l -i -E "cupy|cuda|gpu|[(, ]xp[,)]" "$ROOT"/tests/test_*.py)
if have pytest && [ "${#TEST_FILES[@]}" -gt 0 ]; then
    timeout "$TEST_TIMEOUT" "$PYTHON" -m pytest "${TEST_FILES[@]}" -c "$ROOT/pyproject.toml" \
        --rootdir "$ROOT" -p gpu_select -p no:cacheprovider -q -rs 2>&1 \
        | tee "$OUTDIR/pytest-gpu.log"
    TESTS=${PIPESTATUS[0]}
    # pytest: 5 means no test was selected.
else
    echo "pytest is not installed, or no test file mentions a GPU: GPU tests not run" \
        | tee "$OUTDIR/pytest-gpu.log"
    TESTS=missing
fi

# --- 4. The launch-configuration sweep, then the benchmark.
if [ "$DRY_RUN" = 0 ]; then
    timeout "$TUNING_TIMEOUT" "$PYTHON" -m bench.cuda_tuning --out "$OUTDIR/cuda-tuning.json" \
        2>&1 | tail -n 80
    TUNING=${PIPESTATUS[0]}
    # shellcheck disable=SC2086  # BENCH_ARGS: extra benchmark flags, split on spaces
    timeout "$BENCH_TIMEOUT" "$PYTHON" -m bench --gpu --time-limit "$BENCH_LIMIT" \
        --budget "$BENCH_BUDGET" ${BENCH_ARGS:-} --out "$OUTDIR/bench-gpu.json" 2>&1 \
        | tee "$OUTDIR/bench-gpu.log"
    BENCH=${PIPESTATUS[0]}
    # Step plans (issue 17 item 1): the default path, same and new gradient addresses each
    # step, the full path and torch fused on ResNet-50, GPT-2 small and 1000 x 1000.
    # Appended to bench-gpu.log: no file more to bring back.
    timeout "$PLANS_TIMEOUT" "$PYTHON" -m bench.gpu_plans 2>&1 | tee -a "$OUTDIR/bench-gpu.log"
    PLANS=${PIPESTATUS[0]}
    # Quantized states (issue 14): state bytes per parameter and the 8-bit step's speed.
    timeout "$BENCH_TIMEOUT" "$PYTHON" -m bench.low_memory --gpu \
        --json "$OUTDIR/low-memory-gpu.json" 2>&1 | tee "$OUTDIR/low-memory-gpu.log"
else
    TUNING=skipped
    PLANS=skipped
    echo "dry run: a tiny CPU benchmark instead of the GPU one"
    timeout "$BENCH_TIMEOUT" "$PYTHON" -m bench --quick --optimizers adam,lion \
        --impls ours-fused,ours-generic,naive-numpy,torch-fused \
        --out "$OUTDIR/bench-gpu.json" 2>&1 | tee "$OUTDIR/bench-gpu.log"
    BENCH=${PIPESTATUS[0]}
fi

# --- 5. Summary.
{
    echo "optim-core GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), card: $CARD, dry run: $DRY_RUN"
    echo "GPU tests exit status: $TESTS ($(tail -n1 "$OUTDIR/pytest-gpu.log"))"
    echo "launch sweep exit status: $TUNING"
    echo "step plans exit status: $PLANS"
    if [ -f "$OUTDIR/bench-gpu.log" ]; then grep -E '^target plans' "$OUTDIR/bench-gpu.log"; fi
    echo "benchmark exit status: $BENCH (124: timed out; the cells measured are still written)"
    if [ -f "$OUTDIR/bench-gpu.md" ]; then grep -E '^(floor|target)' "$OUTDIR/bench-gpu.md"; fi
    echo "total: $(( $(date +%s) - START )) s"
} 2>&1 | tee "$OUTDIR/summary.txt"
[ "$BENCH" = 0 ] && { [ "$TESTS" = 0 ] || [ "$TESTS" = 5 ]; }
