#!/usr/bin/env bash
# The GPU check: this project's GPU figures and CUDA-only tests from one command, in under 8 minutes on one H100.
#
# Parts, each a process of its own under its own time limit (`timeout`), so that one that fails or hangs costs
# only its own figures:
#   setup        the data and missing packages (see "Assumes"), the machine (card, driver, CUDA, torch, vLLM and
#                liger versions), and the random teacher and config-only student the later parts share
#   cuda_tests   the tests that skip without CUDA (the CUDA generator in checkpoints, Liger's fused CE) and the
#                head-dtype tests, which run on the GPU there
#   capture      capture_throughput.py: bare forward, transformers and vLLM backends, float32 and bfloat16 (a
#                bfloat16 body with the float32 head), on the 220M random teacher (`--shape large`)
#   train_step   train_step.py: cached KD of each target kind against CE and online KD, time and peak memory
#                (a 271M random teacher, a 107M student, 8 x 1024 tokens a step)
#   quality      quality.py: CE, top-64 + tail, sampled, hybrid and online rows, 100 steps each, on the shared
#                random teacher; it checks the pipeline and the run-time ratios on the GPU, not the gap shares
#                (a random teacher is no better than CE on real text: RESULTS.md section 6 has the real ones)
#   distributed  on 2+ GPUs: DDP and FSDP2 under torchrun over every GPU, 30 steps each; on one GPU, where NCCL
#                cannot put two ranks, tests/test_distributed.py (2 ranks on the CPU, gloo, under torchrun)
# The parts' limits add up to 470 s; a part starts with what is left of them at most.
#
# Writes to ${OUT:-benchmarks/results/gpu}: gpu_check.json (the machine; per part its rc, status, seconds,
# limit, headline figures under "summary" and the full figures its script wrote) and logs/PART.log. Exit status:
# 0 when every part ran and passed, 1 when one failed or ran out of time, 2 when setup failed (then nothing else
# runs: no CUDA, data or packages missing) or an option is wrong.
#
#   benchmarks/gpu_check.sh [--cpu] [--parts setup,capture,...] [--out DIR]
#   benchmarks/gpu_check.sh --pack [--python-version 3.12]
#
# --cpu runs every part on the CPU at tiny sizes (about 4 minutes on 2 idle cores): it checks the plumbing, not the
# GPU; DEVICE=cpu does the same. In that mode cuda_tests runs only the tests named for CUDA (they skip), capture
# leaves out vLLM, and distributed runs 2 gloo ranks. A part's limit can be set as GPU_CHECK_LIMIT_<part>=SECONDS,
# the total as GPU_CHECK_SECONDS.
#
# Assumes:
#   - a python3 (or $PYTHON) whose torch has CUDA; else the check stops after setup, exit status 2. It also uses
#     transformers, click, pyyaml, pyarrow, fsspec, numpy, matplotlib and pytest from that Python;
#   - this project's other needs (zarr, numcodecs, datasets and theirs) importable, or as wheels in .bench/gpu/wheels,
#     installed into the work folder (nothing is downloaded); liger-kernel likewise, else its tests skip; vLLM if
#     installed, else its capture rows are left out (its wheel is too big to bring along);
#   - the Llama-2 tokenizer and Tiny Shakespeare in ../shared/data beside the repository, as every benchmark reads
#     them; where they are missing and .bench/gpu/data holds them, ../shared/data is made a link to it.
# --pack, on a machine with this project installed and a package index, fills .bench/gpu: wheels of those packages
# at this machine's versions for --python-version (x86-64 Linux), and a copy of ../shared/data (16 MB in all).
# Copy .bench/gpu along with the working tree to a GPU machine that has no network.

set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUNDLE="$REPO/.bench/gpu"
PARTS=(setup cuda_tests capture train_step quality distributed)
declare -A LIMITS=([setup]=40 [cuda_tests]=60 [capture]=100 [train_step]=115 [quality]=85 [distributed]=70)
BUNDLED=(zarr numcodecs donfig google-crc32c datasets dill multiprocess)  # not in a plain CUDA PyTorch image

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    exit "${1:-0}"
}

fail() {
    echo "gpu_check.sh: $*" >&2
    exit 2
}

pack() {
    local pyv=$1 spec=() name version
    for name in "${BUNDLED[@]}"; do
        version=$("$PYTHON" -c "from importlib import metadata; print(metadata.version('$name'))" 2>/dev/null) ||
            fail "--pack: $name is not installed in $PYTHON; install the project first (make install)."
        spec+=("$name==$version")
    done
    version=$("$PYTHON" -c "from importlib import metadata; print(metadata.version('liger-kernel'))" 2>/dev/null)
    spec+=("liger-kernel${version:+==$version}")
    rm -rf "$BUNDLE"
    mkdir -p "$BUNDLE/wheels" || fail "--pack: cannot create $BUNDLE."
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyv" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$BUNDLE/wheels" "${spec[@]}" || fail "--pack: pip download failed (see above)."
    [ -d "$REPO/../shared/data" ] || fail "--pack: $REPO/../shared/data is missing: it holds the tokenizer and text."
    cp -rL "$REPO/../shared/data" "$BUNDLE/data" && chmod -R u+w "$BUNDLE/data"
    echo "packed for Python $pyv:" "$BUNDLE"/wheels/*.whl
    du -sh "$BUNDLE"
}

# --- the parts: each runs as `bash -c part_NAME` under `timeout`, in the repository, its output in its log -------

part_setup() {
    set -e
    if [ ! -e "$REPO/../shared/data" ]; then
        [ -d "$BUNDLE/data" ] || { echo "error: $REPO/../shared/data is missing, and so is $BUNDLE/data;" \
            "run benchmarks/gpu_check.sh --pack where the data is and bring .bench/gpu along." >&2; exit 2; }
        mkdir -p "$REPO/../shared" && ln -s "$BUNDLE/data" "$REPO/../shared/data"
        echo "linked $REPO/../shared/data -> $BUNDLE/data"
    fi
    local wheels=() project=() liger=() wheel
    shopt -s nullglob
    for wheel in "$BUNDLE"/wheels/*.whl; do
        case ${wheel##*/} in liger_kernel-*) liger+=("$wheel") ;; *) project+=("$wheel") ;; esac
    done
    has() { "$PYTHON" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, sys.argv[1:])))" "$@"; }
    has zarr numcodecs datasets || wheels+=("${project[@]}")
    [ "$DEVICE" = cpu ] || has liger_kernel || wheels+=("${liger[@]}")
    if [ ${#wheels[@]} -gt 0 ]; then
        echo "installing into $WORK/site: ${wheels[*]##*/}"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
            "${wheels[@]}"
    fi
    "$PYTHON" benchmarks/gpu_check.py probe --device "$DEVICE" --json "$WORK/probe.json"
    "$PYTHON" -c "import zarr, numcodecs, datasets" || { echo "error: zarr, numcodecs or datasets is missing from" \
        "$PYTHON; install the project (pip install -e .) or bring the wheels of --pack in .bench/gpu." >&2; exit 2; }
    "$PYTHON" benchmarks/gpu_check.py models --size "$SIZE" --work "$WORK/models"
}

part_cuda_tests() {
    local select=(tests/test_integrity_training.py::test_checkpoint_restores_the_cuda_generator tests/test_liger.py
                  tests/test_head_dtype.py)
    [ "$DEVICE" = cpu ] && select+=(-k cuda)  # the CUDA tests alone: they skip, the rest takes minutes on a CPU
    "$PYTHON" -m pytest -q -rs -p no:cacheprovider --junitxml="$WORK/cuda_tests.xml" "${select[@]}"
}

part_capture() {
    local sizes=(--samples 256 --seq-len 512 --batch-size 16 --shape large --backends "forward,transformers,vllm")
    [ "$DEVICE" = cpu ] && sizes=(--model "$WORK/models/teacher" --samples 8 --seq-len 32 --batch-size 4
                                  --backends "forward,transformers")
    "$PYTHON" benchmarks/capture_throughput.py --device "$DEVICE" --dtypes float32,bfloat16 "${sizes[@]}" \
        --json "$WORK/capture.json"
}

part_train_step() {
    local sizes=(--batch 8 --seq 1024 --hidden 768 --layers 8 --teacher-hidden 1024 --teacher-layers 16 --steps 5)
    [ "$DEVICE" = cpu ] && sizes=(--teacher "$WORK/models/teacher" --batch 2 --seq 32 --hidden 64 --layers 1
                                  --chunk 16 --steps 1)
    "$PYTHON" benchmarks/train_step.py --device "$DEVICE" "${sizes[@]}" --workdir "$WORK/train_step" \
        --json "$WORK/train_step.json"
}

part_quality() {
    local sizes=(--steps 100 --batch-size 16 --seq-len 256 --heldout-samples 64)
    [ "$DEVICE" = cpu ] && sizes=(--steps 2 --batch-size 2 --seq-len 32 --heldout-samples 4 --chunk-positions 64)
    "$PYTHON" benchmarks/quality.py --teacher "$WORK/models/teacher" --student-config "$WORK/models/student" \
        --train-data "$WORK/models/train.txt" --heldout-data "$WORK/models/heldout.txt" --output "$WORK/quality" \
        --rows ce,topk_tail_k64,sampled_n50,hybrid_k64_n50 --seeds 0 --device "$DEVICE" "${sizes[@]}"
}

part_distributed() {
    local folder="$WORK/distributed" gpus=0 ranks=2 rc=0 mode
    local seq=512 samples=512 batch=8 steps=30
    [ "$DEVICE" = cpu ] && { seq=32; samples=24; batch=2; steps=2; }
    mkdir -p "$folder"
    [ "$DEVICE" = cuda ] && gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    if [ "$DEVICE" = cuda ] && [ "$gpus" -lt 2 ]; then
        echo "{\"gpus\": $gpus, \"ranks\": 2, \"device\": \"cpu\", \"modes\": [], \"note\": \"one GPU: NCCL puts" \
             "one rank on each GPU, so DDP and FSDP2 ran as tests/test_distributed.py, 2 gloo ranks on the CPU\"}" \
             > "$folder/plan.json"
        "$PYTHON" -m pytest -q -rs -p no:cacheprovider --junitxml="$folder/tests.xml" tests/test_distributed.py
        return
    fi
    [ "$DEVICE" = cuda ] && ranks=$gpus
    echo "{\"gpus\": $gpus, \"ranks\": $ranks, \"device\": \"$DEVICE\", \"modes\": [\"ddp\", \"fsdp\"]," \
         "\"batch_per_rank\": $batch, \"seq_len\": $seq, \"steps\": $steps}" > "$folder/plan.json"
    "$PYTHON" -m teacher_cache.cli build --model "$WORK/models/teacher" --dataset "$WORK/models/train.txt" \
        --output "$folder/store" --seq-len "$seq" --max-samples "$samples" --batch-size 8 --device "$DEVICE" ||
        return
    for mode in ddp fsdp; do
        "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$ranks" -m student_train.cli \
            --store "$folder/store" --student "$WORK/models/student" --output "$folder/$mode" --distributed "$mode" \
            --device "$DEVICE" --batch-size "$batch" --max-steps "$steps" --log-every 1 --eval-every "$steps" \
            --save-every "$steps" --loss forward_kl=0.9 --loss ce=0.1 --targets-from topk_tail || rc=$?
    done
    return "$rc"
}

# --- the driver ----------------------------------------------------------------------------------------------------

now() { date +%s.%N; }

run_part() {
    local name=$1 limit_var="GPU_CHECK_LIMIT_$1" limit left began rc seconds
    limit=${!limit_var:-${LIMITS[$name]}}
    left=$(awk -v total="$TOTAL" -v start="$START" -v now="$(now)" 'BEGIN { printf "%d", total - (now - start) }')
    if [ "$left" -lt 5 ]; then
        printf '%s\t-\t0\t%s\n' "$name" "$limit" >> "$WORK/parts.tsv"
        echo "[$name] not run: the ${TOTAL} s of the check are spent"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "[$name] up to ${limit} s, log: $OUT/logs/$name.log"
    began=$(now)
    (cd "$REPO" && timeout -k 10 "$limit" bash -c "part_$name") > "$OUT/logs/$name.log" 2>&1
    rc=$?
    seconds=$(awk -v began="$began" -v now="$(now)" 'BEGIN { printf "%.1f", now - began }')
    printf '%s\t%d\t%s\t%s\n' "$name" "$rc" "$seconds" "$limit" >> "$WORK/parts.tsv"
    echo "[$name] rc $rc in $seconds s"
    return "$rc"
}

main() {
    DEVICE=${DEVICE:-cuda}
    OUT=${OUT:-$REPO/benchmarks/results/gpu}
    PYTHON=${PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}
    local selected=("${PARTS[@]}") pyv=3.12 do_pack=0 name
    while [ $# -gt 0 ]; do
        case $1 in
            --cpu) DEVICE=cpu ;;
            --out) OUT=${2:?--out needs a folder}; shift ;;
            --parts) IFS=, read -r -a selected <<< "${2:?--parts needs a list}"; shift ;;
            --pack) do_pack=1 ;;
            --python-version) pyv=${2:?--python-version needs a version such as 3.12}; shift ;;
            -h|--help) usage 0 ;;
            *) echo "gpu_check.sh: unknown option $1" >&2; usage 2 ;;
        esac
        shift
    done
    [ "$do_pack" = 1 ] && { pack "$pyv"; return; }
    case $DEVICE in
        cuda) SIZE=gpu; TOTAL=${GPU_CHECK_SECONDS:-470} ;;
        cpu) SIZE=cpu; TOTAL=${GPU_CHECK_SECONDS:-3600}
             for name in "${PARTS[@]}"; do LIMITS[$name]=600; done ;;
        *) fail "DEVICE=$DEVICE: use cuda (the default) or cpu (the same as --cpu)." ;;
    esac
    for name in "${selected[@]}"; do
        [ -n "${LIMITS[$name]+set}" ] || fail "--parts: unknown part '$name'; the parts are ${PARTS[*]}."
    done
    [[ " ${selected[*]} " == *" setup "* ]] || selected=(setup "${selected[@]}")  # every other part needs it
    command -v timeout > /dev/null || fail "timeout (GNU coreutils) is not installed."
    "$PYTHON" -c "" 2> /dev/null || fail "no Python at '$PYTHON': set PYTHON to the one that holds torch."

    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
    [ -n "${KEEP_WORK:-}" ] || trap 'rm -rf "$WORK"' EXIT
    mkdir -p "$OUT/logs" || fail "cannot write to $OUT; pass --out DIR."
    rm -f "$OUT/gpu_check.json" "$OUT"/logs/*.log
    export REPO BUNDLE WORK PYTHON DEVICE SIZE HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
    export TQDM_MININTERVAL=10  # progress bars every 10 s: short logs
    export PYTHONPATH="$WORK/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    export -f part_setup part_cuda_tests part_capture part_train_step part_quality part_distributed
    echo "GPU check on $DEVICE with $PYTHON; work folder $WORK; results in $OUT"

    START=$(now)
    local status=0
    for name in "${PARTS[@]}"; do
        [[ " ${selected[*]} " == *" $name "* ]] || continue
        run_part "$name" && continue
        status=1
        if [ "$name" = setup ]; then
            tail -n 20 "$OUT/logs/setup.log" >&2
            echo "gpu_check.sh: setup failed, so nothing else ran; the lines above are the end of" \
                 "$OUT/logs/setup.log." >&2
            status=2
            break
        fi
    done
    "$PYTHON" "$REPO/benchmarks/gpu_check.py" report --work "$WORK" --json "$OUT/gpu_check.json" || status=1
    echo "wrote $OUT/gpu_check.json"
    return "$status"
}

main "$@"; exit  # exit on the same line: bash reads no further, so an edit of this file cannot break a run
