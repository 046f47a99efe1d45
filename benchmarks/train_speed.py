"""Training speed on the CPU: patches per second of one training step (forward, backward,
RMSprop) of the reference model, batch 8 of 128 x 128 patches, in the configurations that
``train`` can run, each in a fresh process, taken in rounds.

Usage: python benchmarks/train_speed.py [--steps 12] [--rounds 2] [--batch 8] [--patch 128]
Prints a Markdown table and the CPU's model and instruction sets (for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time

CONFIGS = {  # name: (bf16 autocast + channels-last, keep_freed_memory)
    "fp32 (before)": (False, False),
    "fp32, freed memory kept": (False, True),
    "bf16 autocast + channels-last": (True, False),
    "bf16 autocast + channels-last, freed memory kept": (True, True),
}


def child(bf16: bool, keep: bool, steps: int, batch: int, patch: int) -> None:
    import torch
    import torch.nn.functional as F

    from tiramisu_brats.export import default_weights
    from tiramisu_brats.model import load_model
    from tiramisu_brats.train import keep_freed_memory

    if keep:
        keep_freed_memory()
    model = load_model(default_weights()).train()
    x = torch.randn(batch, 4, patch, patch)
    y = torch.randint(0, 4, (batch, patch, patch))
    if bf16:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    print(json.dumps(times[2:]))  # the first steps allocate and pick kernels


def cpu_line() -> str:
    from speed import cpu_name  # benchmarks/speed.py, beside this file

    from tiramisu_brats.infer import cpu_count

    return f"{cpu_name()}, {cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(bool(args.child[0]), bool(args.child[1]), args.steps, args.batch, args.patch)
        return
    per: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name, (bf16, keep) in CONFIGS.items():
            cmd = [sys.executable, __file__, "--child", str(int(bf16)), str(int(keep)),
                   "--steps", str(args.steps), "--batch", str(args.batch), "--patch",
                   str(args.patch)]
            try:
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            except subprocess.CalledProcessError as err:  # its stderr says why
                sys.stderr.write(err.stderr)
                sys.exit(f"failed ({err.returncode}): {shlex.join(cmd)}")
            per[name] += json.loads(out.strip().splitlines()[-1])
            print(f"round {r + 1}: {name}: {args.batch / statistics.median(per[name]):.2f} "
                  "patches/s so far", file=sys.stderr)
    from tiramisu_brats.infer import has_bf16

    # train on the CPU: bf16 and channels-last only where the CPU computes in bf16, freed
    # memory kept always (train._setup)
    default = (has_bf16(), True)
    base = args.batch / statistics.median(per["fp32 (before)"])
    print(f"CPU: {cpu_line()}\n")
    print(f"Batch {args.batch} of {args.patch} x {args.patch} patches; median of "
          f"{len(per['fp32 (before)'])} steps per configuration ({args.rounds} rounds).\n")
    print("| configuration | s per step | patches/s | vs before |")
    print("|---|---:|---:|---:|")
    for name, times in per.items():
        med = statistics.median(times)
        shown = name + (" (train's default here)" if CONFIGS[name] == default else "")
        print(f"| {shown} | {med:.2f} | {args.batch / med:.2f} | {args.batch / med / base:.1f}x |")


if __name__ == "__main__":
    main()
