"""`make soak`: the consensus simulation over as many seeds as a time budget
allows, reporting seeds per second and the simulated time covered.

    python tests/sim/soak.py --hours 2 --start 1000

Each seed is the same run as a CI seed of tests/sim/test_consensus_sim.py
(3 or 5 replicas, random registry writes and linearizable reads, seeded
drops, duplicates, reordering, delays, partitions, crashes and restarts),
checked the same way. A failure prints the seed and the command that replays
it; add the seed to REGRESSION_SEEDS there so CI runs it from then on.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_consensus_sim import describe, run_sim  # noqa: E402

from trustnet.consensus.linearizability import RegistryModel, check  # noqa: E402


def failure(sim) -> str | None:
    if sim.checker.violations:
        return f"invariant violated: {sim.checker.violations[:5]}"
    result = check(RegistryModel(), sim.history, timeout=60.0)
    if result.ok is False:
        return f"history not linearizable: {result.explanation}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=1.0, help="wall-clock budget")
    parser.add_argument("--start", type=int, default=1000, help="first seed (CI runs 0..N)")
    parser.add_argument("--seeds", type=int, default=0, help="stop after this many (0: budget only)")
    args = parser.parse_args()

    began = time.monotonic()
    deadline = began + args.hours * 3600
    simulated = 0.0
    done = 0
    for seed in itertools.count(args.start):
        if time.monotonic() >= deadline or (args.seeds and done >= args.seeds):
            break
        with tempfile.TemporaryDirectory(prefix="trustnet-soak-") as tmp:
            sim = run_sim(seed, tmp)
        simulated += sim.net.trace[-1].time if sim.net.trace else 0.0
        done += 1
        problem = failure(sim)
        if problem:
            print(f"FAIL seed={seed}: {problem}\n{describe(sim)}\nreplay: "
                  f"TRUSTNET_SIM_SEEDS={seed + 1} python -m pytest "
                  f"'tests/sim/test_consensus_sim.py::test_consensus_sim[seed{seed}]'", flush=True)
            return 1
        if done % 25 == 0:
            report(done, began, simulated, seed)
    report(done, began, simulated, args.start + done - 1)
    return 0


def report(done: int, began: float, simulated: float, last_seed: int) -> None:
    wall = time.monotonic() - began
    print(f"seeds {done} (last {last_seed}), {done / wall:.2f} seeds/s, "
          f"simulated {simulated / 3600:.3f} h in {wall / 60:.1f} min of real time "
          f"({simulated / wall:.1f}x real time)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
