#!/usr/bin/env bash
# The prepared GPU check: one run on a GPU machine writes one JSON of results.
#
#   bash scripts/gpu_check.sh [--binary PATH] [--device cuda|vulkan|cpu] [--out DIR]
#                             [--peak-tflops N] [--quick]
#
# Needs a release binary built with the GPU feature (`cargo build --release -p troupe-cli
# --features cuda`; default path target/release/troupe) and, for the PyTorch side, python3 with
# torch + diffusers (skipped, and said so in the JSON, when missing). Steps, each under its own
# time limit (a step that runs out is recorded as timed out, the others still run):
#   1. tiny:   configs/tiny.toml for 8 steps on the device and on the CPU; the first losses must
#              agree within 2e-3 (absolute; f32 on both, reduction orders differ).  ≤ 240 s
#   2. troupe: `troupe debug bench-train` on the SDXL UNet config at 1024² (latent 128²),
#              batch 1 and 2, frozen UNet in bf16 (`--dtype bf16`; adapter and AdamW f32),
#              the recomputing attention (`--attention efficient`).               ≤ 240 s each
#   3. torch:  scripts/bench_train_gpu.py, the same step in PyTorch (bf16 autocast, SDPA),
#              batch 1 and 2.                                                      ≤ 240 s
# Total ≤ about 16 minutes in the worst case; typically far less. `--quick` checks the script
# itself on a CPU machine: the tiny UNet at latent 8² instead of SDXL, 2 tiny steps.
# Prints the JSON path; the JSON has every command, its exit status, seconds and output.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=target/release/troupe device=cuda out=/tmp/troupe-gpu-check peak="" quick=0
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) bin=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --peak-tflops) peak=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$bin" ] || { echo "$bin: no troupe binary (build with --features cuda)" >&2; exit 2; }
rm -rf "$out" && mkdir -p "$out/logs"

# run NAME LIMIT CMD...: runs CMD under `timeout`, output to logs/NAME.out, status recorded.
run() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/logs/$name.out" 2>"$out/logs/$name.err"
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" >>"$out/steps.tsv"
  return $rc
}

if [ "$quick" = 1 ]; then
  unet=configs/tiny-sdxl/unet/config.json lat=8 train_steps=2 dim_head=8 rank=4
else
  unet=crates/troupe-models/tests/fixtures/flops/sdxl_config.json lat=128 train_steps=8 dim_head=64 rank=128
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader >"$out/logs/nvidia-smi.out" 2>&1

# The tiny config for a few steps (no samples or validation) on DEVICE into RUN_DIR.
tiny=("$bin" train --config configs/tiny.toml --set "train.max_steps=$train_steps"
  --set samples.every_steps=0 --set validation.every_steps=0
  --set "checkpoint.every_steps=$train_steps")
run tiny-device 240 "${tiny[@]}" --set "run.dir=$out/tiny-device" --set "train.device=$device"
run tiny-cpu 240 "${tiny[@]}" --set "run.dir=$out/tiny-cpu" --set train.device=cpu
for b in 1 2; do
  run "troupe-b$b" 240 "$bin" debug bench-train --unet-config "$unet" --device "$device" \
    --batch "$b" --height "$lat" --width "$lat" --lora-rank "$rank" --ppr-dim-head "$dim_head" \
    --dtype bf16 --attention efficient --steps 3 --warmup 1 ${peak:+--peak-tflops "$peak"} --json
done
py=${PYTHON:-python3}
torch_device=$device; [ "$device" = vulkan ] && torch_device=cuda
if "$py" -c "import torch, diffusers" 2>/dev/null; then
  run torch 240 "$py" scripts/bench_train_gpu.py --unet-config "$unet" --device "$torch_device" \
    --batch 1 2 --height "$lat" --width "$lat" --lora-rank "$rank" --ppr-dim-head "$dim_head" \
    --steps 3 --warmup 1 ${peak:+--peak-tflops "$peak"}
else
  printf 'torch\tskipped\t0\t%s has no torch/diffusers\n' "$py" >>"$out/steps.tsv"
fi

# One JSON: the steps, the tiny loss comparison, both benchmarks and their ratios.
"$py" - "$out" "$device" <<'EOF'
import json, os, sys
out, device = sys.argv[1], sys.argv[2]
def read(p):
    try:
        return open(p).read()
    except OSError:
        return ""
steps = []
for line in read(os.path.join(out, "steps.tsv")).splitlines():
    name, rc, secs, cmd = line.split("\t", 3)
    steps.append({"name": name, "exit": rc, "seconds": int(secs), "command": cmd,
                  "timed_out": rc == "124", "stderr_tail": read(os.path.join(out, "logs", name + ".err"))[-1500:]})
def losses(run):
    rows = [json.loads(l) for l in read(os.path.join(out, run, "metrics.jsonl")).splitlines() if l.strip()]
    return [r["loss"] for r in rows if "loss" in r]
dev, cpu = losses("tiny-device"), losses("tiny-cpu")
diff = max((abs(a - b) for a, b in zip(dev, cpu)), default=None)
tiny = {"device_losses": dev, "cpu_losses": cpu, "max_abs_diff": diff, "tolerance": 2e-3,
        "ok": bool(dev) and len(dev) == len(cpu) and diff is not None and diff <= 2e-3}
def lines(name):
    res = []
    for l in read(os.path.join(out, "logs", name + ".out")).splitlines():
        try:
            res.append(json.loads(l))
        except ValueError:
            pass
    return res
troupe = {b: (lines(f"troupe-b{b}") or [None])[0] for b in (1, 2)}
torch = {r["batch"]: r for r in lines("torch")}
ratios = {}
for b in (1, 2):
    t, p = troupe.get(b), torch.get(b)
    if t and p:
        ratios[b] = {"samples_per_s": t["samples_per_s"] / p["samples_per_s"],
                     "memory": (t.get("device_memory_reserved") or 0) / p["peak_memory_bytes"] if p.get("peak_memory_bytes") else None}
result = {"device": device, "gpu": read(os.path.join(out, "logs", "nvidia-smi.out")).strip(),
          "tiny": tiny, "troupe": troupe, "pytorch": torch, "ratios_troupe_over_pytorch": ratios, "steps": steps}
path = os.path.join(out, "gpu_check.json")
json.dump(result, open(path, "w"), indent=1)
print(path)
EOF
