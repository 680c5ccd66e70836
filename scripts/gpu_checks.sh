#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run, most important first, each under its own time limit; every
# output goes to $1 (default: gpu_checks/). Needs torch (CUDA build, with Triton) and Lightning; neither Hydra nor
# W&B (the cuda tests and the benchmark import neither). pytest is installed from wheels in .whl/ when present.
#
#     bash scripts/gpu_checks.sh outdir                        # everything, about 4 minutes on an H100
#     bash scripts/gpu_checks.sh outdir cuda_tests benchmark   # only the named parts
set -u
out=${1:-gpu_checks}
shift || true
parts=" $* "
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
run() {  # run <name> <seconds> <command...>: output to $out/<name>.txt, exit status and seconds appended
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    if [ "$parts" != "  " ] && [[ $parts != *" $name "* ]]; then
        return  # a part left out
    fi
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    echo "exit $? after $((SECONDS - start)) s" >>"$out/$name.txt"
    tail -n 3 "$out/$name.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
python -c "import torch, triton, lightning; print('torch', torch.__version__, 'triton', triton.__version__, \
'lightning', lightning.__version__)" >>"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
if ! python -c "import pytest" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    pip install --no-deps -q .whl/*.whl >"$out/pip.txt" 2>&1
fi

run cuda_tests 240 python -m pytest -q -m cuda -p no:cacheprovider tests/test_kernels.py tests/test_cuda.py \
    tests/test_sharding.py tests/test_threshold_kernels.py
run benchmark 240 python scripts/benchmark.py --device cuda --repeats 10
run agc_profile 90 python - <<'EOF'
# Where AGC's time goes at 1.1B: its kernels against the passes it cannot avoid (read the parameters and the
# gradients once each, scale the gradients once), and timm's loop.
import sys

import torch

sys.path.insert(0, "scripts")
import benchmark  # noqa: E402

benchmark.DEVICE = torch.device("cuda")
params = benchmark.make_model(benchmark.llama_1b())
grads = [torch.randn_like(p) for p in params]
for p, g in zip(params, grads):
    p.grad = g
ours = benchmark.clipper("agc", params, "ignore")
foreach = benchmark.without_kernel(benchmark.clipper("agc", params, "ignore"))
scale = torch.tensor(0.5, device="cuda")


def floor():
    torch._foreach_norm([p.detach() for p in params])
    torch._foreach_norm(grads)
    torch._foreach_mul_(grads, scale)


def timed(fn, repeats=10):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


results = {
    "agc (kernel)": timed(ours),
    "agc (foreach)": timed(foreach),
    "timm loop": timed(lambda: benchmark.timm_adaptive_clip_grad(params)),
    "floor: 2 norm passes + 1 scaling pass": timed(floor),
}
for name, ms in results.items():
    print(f"{name}: {ms:.2f} ms, {ms / results['timm loop']:.2f} of timm")
from torch.profiler import ProfilerActivity, profile  # noqa: E402

with profile(activities=[ProfilerActivity.CUDA]) as prof:
    ours()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
EOF
run policy_profile 90 python - <<'EOF'
# CUDA kernels per step of each adaptive policy, with its one-kernel step and with its PyTorch code, against fixed
# norm clipping, on the 200-tensor model (counted with the profiler after warm-up steps); then value (with skip),
# SPAM and spike skipping, with their kernels and without.
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "scripts")
import benchmark  # noqa: E402

benchmark.DEVICE = torch.device("cuda")
params = benchmark.make_model(benchmark.MODELS["200 tensors / 25M"])
for p in params:
    p.grad = torch.randn_like(p)
cases = {
    "norm": ("norm", "ignore", {}),
    "autoclip": ("autoclip", "ignore", {"warmup_steps": 1}),
    "zclip": ("zclip", "ignore", {"warmup_steps": 1}),
    "adagc": ("adagc", "ignore", {"warmup_steps": 1}),
    "value, skip": ("value", "skip", {"clip_value": 0.01}),
    "spam": ("spam", "ignore", {"warmup_steps": 1, "optimizer": benchmark.adam_with_moments(params)}),
    "norm, skip_spikes=6": ("norm", "skip", {"skip_spikes": 6.0}),
}
for name, (method, nonfinite, kwargs) in cases.items():
    ours = benchmark.clipper(method, params, nonfinite, **kwargs)
    pytorch_ops = benchmark.without_kernel(benchmark.clipper(method, params, nonfinite, **kwargs))
    for label, step in (("kernel", ours), ("PyTorch ops", pytorch_ops)):
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        launched = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
        print(f"{name} ({label}): {launched} CUDA kernels per step")
EOF
run methods 120 python scripts/benchmark.py --methods --device cuda --repeats 10
run fused 150 python scripts/benchmark.py --fused --device cuda --repeats 10
run clip_training 200 python scripts/benchmark.py --clip-training --device cuda --steps 40 --rounds 3
