"""Largest MLP that trains under a memory budget: MirroredStrategy vs ZeRO.

For each mode, a bisection over the hidden width runs each candidate in its
own process under an address-space limit that the operating system enforces
(`RLIMIT_AS`): the child splits the CPU into N logical devices, builds the
model with Adam, trains two steps and exits 0, or dies for lack of memory.
RLIMIT_AS bounds virtual memory, which includes TensorFlow's libraries and
thread stacks (about 1.5-2 GiB before any tensor), so the budget must exceed
that baseline; what it compares fairly is the three modes under one limit.

    python benchmarks/max_model.py [--budget-gib 4] [--replicas 4] [--steps 6] [--layers 3]

Stage 3's saving grows with depth (it materializes a window of layers, the
others hold every layer), so compare it on deep models too (`--layers 12`).
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def child(mode, n, hidden, budget, layers):
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (budget, budget))
    devices = _common.configure_cpus(n)
    _, model = _common.make_strategy_and_model(mode, devices, hidden, layers=layers)
    x, y = _common.make_data(8 * n * 2)
    model.fit(x, y, batch_size=8 * n, epochs=1, verbose=0)
    print(json.dumps({"params": model.count_params()}))


def fits(mode, n, hidden, budget, layers):
    cmd = [sys.executable, __file__, "--child", mode, str(n), str(hidden), str(budget),
           "--layers", str(layers)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode == 0:
        return json.loads(r.stdout.strip().splitlines()[-1])["params"]
    return None


def largest(mode, n, budget, steps, lo=32, max_width=1 << 16, layers=3):
    """Bisection on the width; returns (width, params) of the largest that fits."""
    best = (lo, fits(mode, n, lo, budget, layers))
    if best[1] is None:
        return None, None
    hi = lo * 2
    while hi <= max_width:  # grow until a width fails
        p = fits(mode, n, hi, budget, layers)
        if p is None:
            break
        best, lo, hi = (hi, p), hi, hi * 2
    for _ in range(steps):
        if hi - lo <= 8:
            break
        mid = (lo + hi) // 2
        p = fits(mode, n, mid, budget, layers)
        if p is None:
            hi = mid
        else:
            best, lo = (mid, p), mid
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-gib", type=float, default=4.0)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--start", type=int, default=512, help="first width tried")
    parser.add_argument("--max-width", type=int, default=1 << 16)
    parser.add_argument("--modes", nargs="+", default=list(_common.MODES))
    parser.add_argument("--layers", type=int, default=3, help="hidden layers of the MLP")
    parser.add_argument("--plot", default=None, help="write a PNG bar chart here")
    parser.add_argument("--child", nargs=4)
    args = parser.parse_args()
    if args.child:
        mode, n, hidden, budget = args.child
        return child(mode, int(n), int(hidden), int(budget), args.layers)
    budget = int(args.budget_gib * 2 ** 30)
    print(f"address-space limit {args.budget_gib} GiB, {args.replicas} replicas, Adam, "
          f"{args.layers} hidden layers")
    results = {}
    for mode in args.modes:
        width, params = largest(mode, args.replicas, budget, args.steps, lo=args.start,
                                max_width=args.max_width, layers=args.layers)
        results[mode] = params or 0
        base = results.get("mirrored") or results[mode] or 1
        print(f"{mode:>9}: width {width}, {params or 0:>12,} parameters   "
              f"x{(params or 0) / base:.2f} of mirrored", flush=True)
    if args.plot:
        _common.bar_plot(args.plot, results, "largest model (parameters)",
                         f"RLIMIT_AS {args.budget_gib} GiB, N={args.replicas}")


if __name__ == "__main__":
    main()
