#!/usr/bin/env bash
# What the project measures on a lent GPU, in one call of at most BUDGET seconds (issue #9):
#   1. a set-up check: one tiny update of each method on each task, eager and as a CUDA graph;
#   2. benchmarks/gpu_step.py: a D2GP update (SPC, batch 64, K = 20) eager against a CUDA graph;
#   3. benchmarks/paper_profile.sh's training phase until COMPILE_RESERVE seconds before the end (a
#      training still running then is stopped, keeping its last checkpoint and best.pt; jobs.txt
#      marks it);
#   4. in the time left, gpu_step.py's eager update against torch.compile's (its compilation takes
#      minutes: last, so that it cannot crowd out the rest).
# Everything goes to RESULTS (environment.txt, gpu_step*/, paper_profile/, runs/, *.log); the runs
# are then evaluated on any machine with PHASES=evaluate benchmarks/paper_profile.sh.
#
#   benchmarks/gpu_session.sh RESULTS [BUDGET]
#
# It stops at once (exit 3) when PyTorch sees no GPU or d2gp or deepinv does not load, so that a
# broken set-up costs seconds; a task whose data or one tiny update fails there is left out.
# DEVICE=cpu STEP_ARGS='--batch 8 --steps 2' COMPILE_RESERVE=0 runs it on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:?usage: benchmarks/gpu_session.sh RESULTS [BUDGET]}
BUDGET=${2:-540}
DEVICE=${DEVICE:-cuda}
COMPILE_RESERVE=${COMPILE_RESERVE:-150}  # seconds kept at the end for the compiled step benchmark
STEP_ARGS=${STEP_ARGS:-}  # e.g. --batch 8 --steps 2 on a CPU
PYTHON=${PYTHON:-python3}
start=$(date +%s)
mkdir -p "$RESULTS"
log() { echo "[$(($(date +%s) - start)) s] $*" | tee -a "$RESULTS/session.log"; }
# `d2gp` for run_profile.sh, from this checkout (the machine may have no installed d2gp)
D2GP="$RESULTS/d2gp"
printf '#!/usr/bin/env bash\nexec %q -m d2gp "$@"\n' "$PYTHON" > "$D2GP"
chmod +x "$D2GP"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

log "set-up check"
"$PYTHON" - "$DEVICE" > "$RESULTS/environment.txt" 2>&1 <<'PY' || { cat "$RESULTS/environment.txt"; log "set-up check failed"; exit 3; }
import platform, subprocess, sys, traceback
import torch, deepinv
from d2gp import training
from d2gp.apps import profile_settings
from d2gp.device import describe_device, precision, resolve_device
from d2gp.graphs import GraphedLoss
from d2gp.tasks import make_task
device = resolve_device(sys.argv[1])
precision("training", device)
print(f"{describe_device(device)}; torch {torch.__version__} (CUDA {torch.version.cuda}); deepinv {deepinv.__version__}; "
      f"Python {platform.python_version()}")
if device.type == "cuda":
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                          "--format=csv"], capture_output=True, text=True).stdout)
ready = []
for name in ("spc", "mri", "sr"):  # data from the cache (no data packages there); one tiny update of each method
    try:
        settings, task = profile_settings("paper", name), make_task(name, device=device)
        train = task.images("train", limit=settings["train_images"])
        val = task.images("val", limit=settings["val_images"])
        denoiser = task.denoiser().requires_grad_(False)
        x = train[:2].to(device)
        for method in ("d2gp", "supervised"):
            config = training.TrainConfig(task=name, method=method, iterations=3, batch_size=2)
            npo = training.build_preconditioner(config, task)
            teacher = training.TeacherTargets(task, denoiser, x, 3) if method == "d2gp" else None
            loss, _ = training._loss(config, task, npo, denoiser, x, seed=0,
                                     teacher=teacher[torch.arange(2, device=device)] if teacher else None)
            loss.backward()
            psnr = training._val_psnr("val", config, task, denoiser, val[:4], npo)
            graphed = GraphedLoss(training.functools.partial(training.unrolled_loss, config, task, npo, denoiser),
                                  list(npo.parameters()), capture=device.type == "cuda")
            y_s = training.measure(task.student, x, seed=1)
            try:
                for _ in range(2):
                    graphed(x, y_s, *(teacher[torch.arange(2, device=device)] if teacher else (None, None)))
                captured = f"recorded and replayed {graphed.replays} times"
            except Exception as error:  # the trainings fall back to eager updates
                captured = f"FAILED to record ({type(error).__name__}: {error})"
        print(f"{name}: {len(train)} training and {len(val)} validation images; an update of each method and a "
              f"validation ran on {device} (loss {loss.item():.4g}, val PSNR {psnr:.2f} dB); CUDA graph {captured}")
        ready.append(name)
    except Exception:
        print(f"{name}: FAILED")
        traceback.print_exc()
print("TASKS_READY:", " ".join(ready))
sys.exit(0 if ready else 1)
PY
cat "$RESULTS/environment.txt"
TASKS=$(sed -n 's/^TASKS_READY: *//p' "$RESULTS/environment.txt")
export TASKS

log "step benchmark: eager against CUDA graph"
timeout 150 "$PYTHON" benchmarks/gpu_step.py --device "$DEVICE" --modes eager graph $STEP_ARGS \
  --out "$RESULTS/gpu_step" > "$RESULTS/gpu_step.log" 2>&1 || log "step benchmark failed (rc $?)"

deadline=$((start + BUDGET - COMPILE_RESERVE))
log "paper profile trainings until $((deadline - start)) s"
DEADLINE=$deadline PHASES=train DEVICE=$DEVICE RUNS="$RESULTS/runs" OUT="$RESULTS/paper_profile" \
  D2GP="$D2GP" PYTHON="$PYTHON" bash benchmarks/paper_profile.sh > "$RESULTS/paper_profile.log" 2>&1 \
  || log "paper profile failed (rc $?)"

left=$((start + BUDGET - $(date +%s)))
if ((left > 30)); then
  log "step benchmark: eager against torch.compile, in the $left s left"
  timeout "$left" "$PYTHON" benchmarks/gpu_step.py --device "$DEVICE" --modes eager compile $STEP_ARGS \
    --out "$RESULTS/gpu_step_compile" > "$RESULTS/gpu_step_compile.log" 2>&1 \
    || log "compiled step benchmark failed or ran out of time (rc $?)"
fi
log "done"
