"""What arbitrating a claim costs against a busy lock table: GO, NO GO, the fold of claim events, waking waiters.

    python bench/bench_locks.py [--tasks 200] [--locks-per-task 5] [--claim 20] [--waiting 50] [--rounds 2000]

The table looks like a large job in full flight: 200 tasks holding 1,000 locks (mostly files, some directories,
a third of them shared reads) under a dozen source trees, and 50 more tasks queued with claims of 20 paths. Each
measured claim has 20 paths in the same trees, so every lookup walks populated directories. Reports, in
microseconds, the median and p99 of:

- `go`: a claim that conflicts with nothing, the common case;
- `nogo`: a claim with a few conflicts, held and queued, named in the answer;
- `root`: a claim on the whole worktree (`./`), which conflicts with every held lock: the worst case;
- `apply`: folding one `ClaimGranted` and its `LocksReleased` into the table (what replay does per event);
- `wakeable`: re-checking every waiting task after a release, and (`wakeable_named`) only those whose NO GO
  named the releaser, which is all that can have changed.

Target: `go` and `nogo` p99 well under 1 ms.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import percentile, report

from numerusd import locks
from numerusd.protocol.claims import Lock

TREES = [
    "src/app/models",
    "src/app/routes",
    "src/app/services",
    "src/app/services/billing",
    "src/lib",
    "src/lib/util",
    "tests/unit",
    "tests/unit/models",
    "tests/e2e",
    "docs",
    "docs/api",
    "scripts",
]


def held_claim(rng: random.Random, task: int, size: int) -> list[Lock]:
    """A claim only this task makes: its own files, and now and then its own directory."""
    claim = []
    for i in range(size):
        tree = rng.choice(TREES)
        mode = "read" if rng.random() < 0.33 else rng.choice(["create", "modify", "delete"])
        if rng.random() < 0.1:
            claim.append(Lock(f"{tree}/pkg_{task}_{i}/", mode))  # type: ignore[arg-type]
        else:
            claim.append(Lock(f"{tree}/module_{task}_{i}.py", mode))  # type: ignore[arg-type]
    return claim


def busy_table(
    rng: random.Random, tasks: int, per_task: int, waiting: int, claim: int
) -> tuple[locks.LockTable, dict[str, tuple[str, ...]]]:
    """The table, and for each waiting task the holders its NO GO named."""
    table = locks.EMPTY
    named = {}
    for task in range(tasks):
        decision = locks.arbitrate(table, f"h{task}", held_claim(rng, task, per_task))
        assert isinstance(decision, locks.Granted)
        table = locks.apply_granted(table, f"h{task}", decision.locks)
    for task in range(waiting):
        # Each waiter wants one held file: it is denied, and queued with its whole claim.
        victim = rng.choice(list(table.holders.values()))[0]
        wanted = [Lock(victim.path, "modify"), *held_claim(rng, 10_000 + task, claim - 1)]
        decision = locks.arbitrate(table, f"w{task}", wanted)
        assert isinstance(decision, locks.Denied)
        table = locks.apply_denied(table, f"w{task}", decision.locks)
        named[f"w{task}"] = decision.holders
    return table, named


def timed_us(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return (time.perf_counter() - started) * 1e6


def p50(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def p99(values: list[float]) -> float:
    return round(percentile(values, 99), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200, help="tasks holding locks")
    parser.add_argument("--locks-per-task", type=int, default=5, help="locks each holder holds")
    parser.add_argument("--claim", type=int, default=20, help="paths in each measured claim")
    parser.add_argument("--waiting", type=int, default=50, help="tasks queued with denied claims")
    parser.add_argument("--rounds", type=int, default=2000, help="measurements of each kind")
    args = parser.parse_args()
    rng = random.Random(7)
    table, named = busy_table(rng, args.tasks, args.locks_per_task, args.waiting, args.claim)
    held = sum(len(task_locks) for task_locks in table.holders.values())

    go_claims = [held_claim(rng, 20_000 + i, args.claim) for i in range(args.rounds)]
    nogo_claims = []
    for i in range(args.rounds):
        holders = rng.sample(list(table.holders.values()), 3)
        overlap = [Lock(task_locks[0].path, "modify") for task_locks in holders]
        nogo_claims.append(overlap + held_claim(rng, 30_000 + i, args.claim - len(overlap)))
    for claim in go_claims[:3]:
        assert isinstance(locks.arbitrate(table, "new", claim), locks.Granted)
    for claim in nogo_claims[:3]:
        assert isinstance(locks.arbitrate(table, "new", claim), locks.Denied)

    # Interleaved, so a burst of load on the machine hits every kind alike.
    go, nogo, apply, root = [], [], [], []
    root_claim = [Lock(locks.ROOT, "modify")]
    for i in range(args.rounds):
        go.append(timed_us(lambda claim=go_claims[i]: locks.arbitrate(table, "new", claim)))
        nogo.append(timed_us(lambda claim=nogo_claims[i]: locks.arbitrate(table, "new", claim)))
        granted = locks.canonical(go_claims[i])
        apply.append(timed_us(lambda g=granted: locks.release(locks.apply_granted(table, "new", g), "new")))
        if i % 10 == 0:
            root.append(timed_us(lambda: locks.arbitrate(table, "new", root_claim)))
    # After a release: every waiting task re-checked, or only those whose NO GO named the releaser.
    releaser = named["w0"][0]
    released = locks.release(table, releaser)
    candidates = [task for task, holders in named.items() if releaser in holders]
    assert locks.wakeable(released, candidates) == locks.wakeable(released) == ["w0"]
    wake = [timed_us(lambda: locks.wakeable(released)) for _ in range(max(1, args.rounds // 20))]
    wake_named = [timed_us(lambda: locks.wakeable(released, candidates)) for _ in range(max(1, args.rounds // 20))]

    report(
        "locks",
        held_locks=held,
        holders=len(table.holders),
        waiting=len(table.waiting),
        claim_paths=args.claim,
        go_us_p50=p50(go),
        go_us_p99=p99(go),
        nogo_us_p50=p50(nogo),
        nogo_us_p99=p99(nogo),
        root_us_p50=p50(root),
        apply_us_p50=p50(apply),
        wakeable_us_p50=p50(wake),
        wakeable_named_us_p50=p50(wake_named),
    )


if __name__ == "__main__":
    main()
