#!/usr/bin/env bash
# bench/gpu_check.sh DIR [--wheels WHEELS] [--budget SECONDS] [--cpu-smoke] [--dry-run] [--no-install]
#
# The first minutes on a GPU (one H100/H200, under 8 minutes): the `cuda` tests, `python -m fastgicn.verify` at the
# paper's shapes (full model, 512 x 512), the kernel benchmarks (bench/bench_gicn.py, bench/bench_gpp.py),
# `python -m fastgicn.bench`, the reader benchmark (bench/bench_read.py), the host ceiling
# (bench/bench_pipeline.py --parts host, demo model on cuda) and one synthetic slide end to end on cuda
# (`fastgicn synth` + `fastgicn segment --device cuda`). Every JSON (and each step's log) goes into DIR;
# DIR/summary.json and the table at the end say what ran, passed, failed, timed out or was skipped.
#
# Each step has its own timeout, cut to what is left of --budget (default 450 s): a hang costs one step.
# Without a GPU the GPU steps are skipped (and say so) and the CPU-capable ones run at tiny sizes, as with
# --cpu-smoke (tiny sizes everywhere: checks the script, measures nothing). --dry-run prints the steps only.
#
# Offline GPU machines: what the run needs beyond torch and triton is installed from a local folder of wheels,
#   pip install --no-index --find-links WHEELS <missing packages>
# (WHEELS: --wheels, or $FASTGICN_WHEELS, default ./wheels; only packages that do not import are installed).
# Fill that folder on a machine with internet, for the GPU machine's Python version and platform, e.g. for
# CPython 3.11 on x86-64 Linux (check there: python -c "import sys, sysconfig; print(sys.version, sysconfig.get_platform())"):
#   pip download -d WHEELS --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#       openslide-python openslide-bin imagecodecs tifffile opencv-python-headless shapely scipy pillow \
#       onnx onnxruntime-gpu pytest pytest-timeout tqdm cython setuptools wheel
# (tensorrt is optional: add `tensorrt` if its wheels exist for that Python; torch and triton are assumed.)
# fastgicn itself runs from this checkout (PYTHONPATH); its Cython extension is built in place when missing
# (needs a C compiler, cython and numpy: `python setup.py build_ext --inplace`), or carry the built .so files.
set -u

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }

OUT=""
WHEELS="${FASTGICN_WHEELS:-wheels}"
BUDGET=450
SMOKE=0
DRY=0
INSTALL=1
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS="$2"; shift 2 ;;
        --wheels=*) WHEELS="${1#*=}"; shift ;;
        --budget) BUDGET="$2"; shift 2 ;;
        --budget=*) BUDGET="${1#*=}"; shift ;;
        --cpu-smoke) SMOKE=1; shift ;;
        --dry-run) DRY=1; shift ;;
        --no-install) INSTALL=0; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) if [ -n "$OUT" ]; then echo "gpu_check: one DIR only (got $OUT and $1)" >&2; exit 2; fi
           OUT="$1"; shift ;;
    esac
done
if [ -z "$OUT" ]; then echo "gpu_check: give the output folder: bench/gpu_check.sh DIR" >&2; usage >&2; exit 2; fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
WORK="$OUT/work"
mkdir -p "$WORK"
STEPS="$OUT/steps.tsv"
: > "$STEPS"
START=$(date +%s)

GPU=0
if [ "$DRY" = 0 ] && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    GPU=1
fi
if [ "$DRY" = 1 ]; then
    GPU_NAME="(dry run: not checked)"
elif [ "$GPU" = 1 ]; then
    GPU_NAME="$("$PY" -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null)"
else
    GPU_NAME="none"
    echo "gpu_check: no CUDA GPU detected (torch.cuda.is_available() is False): the GPU steps are skipped and the" \
         "CPU-capable steps run at tiny sizes (as with --cpu-smoke); these figures measure nothing"
    SMOKE=1
fi
echo "gpu_check: DIR=$OUT GPU=$GPU_NAME smoke=$SMOKE budget=${BUDGET}s python=$PY"

# step NAME TIMEOUT NEEDS_GPU CMD...: run CMD with a timeout cut to the remaining budget, log into DIR/NAME.log
step() {
    local name="$1" limit="$2" needs_gpu="$3"
    shift 3
    local now left t0 rc status
    now=$(date +%s)
    left=$((BUDGET - (now - START)))
    if [ "$DRY" = 1 ]; then
        printf '  [dry-run] %-14s (timeout %4ss%s): %s\n' "$name" "$limit" "$([ "$needs_gpu" = 1 ] && echo ', GPU')" "$*"
        printf '%s\tdry-run\t\t0\t%s\n' "$name" "$*" >> "$STEPS"
        return 0
    fi
    if [ "$needs_gpu" = 1 ] && [ "$GPU" = 0 ]; then
        echo "== $name: skipped (no GPU)"
        printf '%s\tskipped (no GPU)\t\t0\t%s\n' "$name" "$*" >> "$STEPS"
        return 0
    fi
    if [ "$left" -lt 15 ]; then
        echo "== $name: skipped (budget of ${BUDGET}s spent)"
        printf '%s\tskipped (budget spent)\t\t0\t%s\n' "$name" "$*" >> "$STEPS"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (timeout ${limit}s): $*"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timed out after ${limit}s" ;;
        *) status="failed (rc $rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$*" >> "$STEPS"
    echo "   $status in $(( $(date +%s) - t0 ))s; last lines of $name.log:"
    tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
    return 0
}

# -- environment ------------------------------------------------------------------------------------------------
step env 30 0 "$PY" - "$OUT/env.json" <<'EOF'
import json, os, platform, subprocess, sys
info = {"python": sys.version, "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": list(os.getloadavg())}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30, capability=f"{p.major}.{p.minor}",
                    gpu_count=torch.cuda.device_count())
except Exception as exc:
    info["torch_error"] = repr(exc)
for mod in ("triton", "openslide", "imagecodecs", "tifffile", "cv2", "shapely", "onnx", "onnxruntime", "tensorrt",
            "numpy", "scipy", "PIL"):
    try:
        info[mod] = getattr(__import__(mod), "__version__", "?")
    except Exception as exc:
        info[mod] = None
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                         "--format=csv,noheader"], capture_output=True, text=True,
                                        timeout=10).stdout.strip()
except Exception:
    info["nvidia_smi"] = None
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
EOF

# -- install what is missing from the local wheels ---------------------------------------------------------------
MISSING="$("$PY" - <<'EOF' 2>/dev/null
import importlib
need = {"openslide": "openslide-python openslide-bin", "imagecodecs": "imagecodecs", "tifffile": "tifffile",
        "cv2": "opencv-python-headless", "shapely": "shapely", "scipy": "scipy", "PIL": "pillow",
        "onnx": "onnx", "onnxruntime": "onnxruntime-gpu", "pytest": "pytest pytest-timeout", "tqdm": "tqdm"}
missing = []
for mod, pkgs in need.items():
    try:
        importlib.import_module(mod)
        if mod == "openslide":
            import openslide  # noqa: F401  libopenslide itself (openslide-bin) must load too
            openslide.__library_version__
    except Exception:
        missing += pkgs.split()
print(" ".join(missing))
EOF
)"
if [ "$INSTALL" = 1 ] && [ -n "$MISSING" ]; then
    if [ -d "$WHEELS" ] || [ "$DRY" = 1 ]; then
        # shellcheck disable=SC2086
        step install 150 0 "$PY" -m pip install --no-index --find-links "$WHEELS" $MISSING
    else
        echo "== install: skipped: missing ($MISSING) but no wheel folder $WHEELS (see the top of this script)"
        printf 'install\tskipped (no wheel folder %s; missing: %s)\t\t0\t\n' "$WHEELS" "$MISSING" >> "$STEPS"
    fi
else
    printf 'install\t%s\t\t0\t\n' "$([ -z "$MISSING" ] && echo 'nothing missing' || echo 'skipped (--no-install)')" >> "$STEPS"
fi
if [ "$DRY" = 0 ] && ! "$PY" -c "import fastgicn._tiler" >/dev/null 2>&1; then
    step build_ext 120 0 "$PY" setup.py build_ext --inplace
fi

# -- the steps (most important first: the budget cuts the last ones) ---------------------------------------------
if [ "$SMOKE" = 1 ]; then
    step cuda_tests 150 1 "$PY" -m pytest -m cuda -q -x -p no:cacheprovider --junitxml "$OUT/pytest_cuda.xml" tests
    step verify 120 0 "$PY" -m fastgicn.verify --device cpu --no-kernels --width 0.0625 --size 64 --batch 1
    step bench 120 0 "$PY" -m fastgicn.bench --width 0.0625 --size 64 --iters 3 --batch 1,2 --backend torch \
        --precision fp32 --slide-size 512 --device cpu --json "$OUT/bench.json"
    step segment_e2e 120 0 bash -c "'$PY' -m fastgicn.cli synth '$WORK/e2e.svs' --size 2048x2048 && \
        '$PY' -m fastgicn.cli segment '$WORK/e2e.svs' -o '$WORK/e2e_out' --device cpu --no-progress --force && \
        cp '$WORK'/e2e_out/*.json '$OUT/'"
    step bench_read 120 0 "$PY" bench/bench_read.py --quick --json "$OUT/read.json"
    step host_ceiling 120 0 "$PY" bench/bench_pipeline.py --parts host --quick --no-real-model \
        --host-json "$OUT/pipeline_host.json" --tmp "$WORK"
    # the kernels' own --smoke runs them under the Triton interpreter (minutes on a small CPU): list the cases only
    step bench_gicn 60 0 bash -c "'$PY' bench/bench_gicn.py --dry-run > '$OUT/gicn_dry_run.json'"
    step bench_gpp 60 0 bash -c "'$PY' bench/bench_gpp.py --dry-run > '$OUT/gpp_dry_run.json'"
else
    NCPU="$("$PY" -c "from fastgicn.cpus import usable_cpus; print(usable_cpus())" 2>/dev/null || nproc)"
    THREADS=$(( NCPU < 8 ? NCPU : 8 ))
    READ_THREADS="$(printf '%s\n' 1 2 4 "$THREADS" | awk -v n="$NCPU" '$1 <= n && !seen[$1]++' | tr '\n' ' ')"
    step cuda_tests 150 1 "$PY" -m pytest -m cuda -q -p no:cacheprovider --timeout 120 \
        --junitxml "$OUT/pytest_cuda.xml" tests
    # the paper's shapes: full width, 512 x 512 (verify's GPU defaults), batch 2
    step verify 90 1 "$PY" -m fastgicn.verify --device cuda --width 1.0 --size 512 --batch 2
    # fp16 (the goals' precision) and 100 latency samples keep it inside its timeout with every backend
    step bench 180 1 "$PY" -m fastgicn.bench --device cuda --precision fp16 --iters 100 --reader-threads "$THREADS" \
        --json "$OUT/bench.json"
    step segment_e2e 90 1 bash -c "'$PY' -m fastgicn.cli synth '$WORK/e2e.svs' --size 16384x16384 && \
        '$PY' -m fastgicn.cli segment '$WORK/e2e.svs' -o '$WORK/e2e_out' --device cuda --threads $THREADS \
        --no-progress --force && cp '$WORK'/e2e_out/*.json '$OUT/'"
    step bench_gicn 60 1 "$PY" bench/bench_gicn.py --out "$OUT/gicn.json"
    step bench_gpp 45 1 "$PY" bench/bench_gpp.py --out "$OUT/gpp.json"
    step bench_read 75 0 "$PY" bench/bench_read.py --repeats 3 --threads $READ_THREADS --json "$OUT/read.json"
    step host_ceiling 90 0 "$PY" bench/bench_pipeline.py --parts host --threads "$THREADS" --repeats 2 \
        --device cuda --host-json "$OUT/pipeline_host.json" --tmp "$WORK"
fi
# verify prints a table, no JSON: keep its verdict as JSON beside the others
if [ -f "$OUT/verify.log" ]; then
    "$PY" - "$OUT/verify.log" "$OUT/verify.json" "$STEPS" <<'EOF'
import json, sys
log = open(sys.argv[1], errors="replace").read()
status = next((l.split("\t")[1] for l in open(sys.argv[3]) if l.startswith("verify\t")), None)
json.dump({"step_status": status, "log_tail": log[-6000:]}, open(sys.argv[2], "w"), indent=1)
EOF
fi

# -- summary -----------------------------------------------------------------------------------------------------
"$PY" - "$STEPS" "$OUT" "$START" "$GPU_NAME" "$SMOKE" <<'EOF'
import json, os, sys, time
steps_file, out, start, gpu, smoke = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
rows = []
for line in open(steps_file):
    name, status, rc, secs, cmd = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
    rows.append({"step": name, "status": status, "rc": int(rc) if rc.strip() else None,
                 "seconds": int(secs or 0), "command": cmd})
jsons = sorted(f for f in os.listdir(out) if f.endswith(".json") and f != "summary.json")
summary = {"gpu": gpu, "smoke": smoke, "seconds": int(time.time()) - start, "steps": rows, "json_files": jsons,
           "all_ok": all(r["status"] in ("ok", "nothing missing") or r["status"].startswith("skipped")
                         or r["status"] == "dry-run" for r in rows)}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(f"\ngpu_check summary ({gpu}{', smoke sizes' if smoke else ''}, {summary['seconds']} s):")
for r in rows:
    print(f"  {r['step']:<14} {r['status']:<30} {r['seconds']:>4} s")
print(f"  JSON in {out}: {', '.join(jsons) or 'none'}")
EOF
