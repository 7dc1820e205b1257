"""How long validating a planner's answer takes: decode, every check, canonical form and hash, of a 200-task plan.

    python bench/bench_plan.py [--tasks 200] [--rounds 200]

The plan looks like a real one for a large goal: tasks in layers, each depending on one to three earlier tasks,
each with one to four intents (files, some globs, a few directories) under a handful of source trees. It is
validated twice per round: once against a real repository directory holding those trees, so every intent path
is `lstat`ed for symlinks, and once without one. Reports the median and p99, and as a yardstick for the machine
the median of merely parsing the same bytes with the standard library's `json.loads`. Target: p50 <= 100 ms.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import report

from numerusd.plans import ValidatedPlan, validate_plan

TREES = ["src/app/models", "src/app/routes", "src/app/services", "src/lib", "tests/unit", "tests/e2e", "docs"]


def planner_answer(n: int, seed: int = 7) -> bytes:
    """A plan of `n` tasks as a model would write it (pretty-printed, all fields present)."""
    rng = random.Random(seed)
    tasks = []
    for i in range(1, n + 1):
        earlier = [f"t{j}" for j in range(max(1, i - 30), i)]
        deps = rng.sample(earlier, min(len(earlier), rng.randint(1, 3))) if i > 8 else []
        intents = []
        for _ in range(rng.randint(1, 4)):
            tree = rng.choice(TREES)
            kind = rng.random()
            if kind < 0.7:
                intents.append(
                    {"path": f"{tree}/module_{i}_{len(intents)}.py", "mode": rng.choice(["create", "modify"])}
                )
            elif kind < 0.9:
                intents.append({"path": f"{tree}/**/*_{i}.py", "mode": "modify"})
            else:
                intents.append({"path": f"{tree}/", "mode": "modify"})
        tasks.append(
            {
                "id": f"t{i}",
                "title": f"Implement step {i} of the billing migration",
                "instructions": (
                    f"Move the invoice logic for region {i % 12} into the new service layer, keep the public API, "
                    "add unit tests for every branch you touch and update the docs page that describes it. "
                )
                * 3,
                "role": "executor",
                "deps": deps,
                "intents": intents,
            }
        )
    return json.dumps({"summary": "Migrate billing to the service layer.", "tasks": tasks}, indent=2).encode()


def elapsed_ms(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200, help="tasks in the plan")
    parser.add_argument("--rounds", type=int, default=200, help="validations per measurement")
    args = parser.parse_args()
    raw = planner_answer(args.tasks)
    with tempfile.TemporaryDirectory(prefix="numerus-bench-plan-") as tmp:
        repo = Path(tmp)
        for tree in TREES:
            (repo / tree).mkdir(parents=True)
        for tree in TREES[:3]:
            (repo / tree / "existing.py").write_text("")
        result = validate_plan(raw, repo=repo)
        assert isinstance(result, ValidatedPlan), result[:3]
        # Interleaved rounds, so a burst of load on the machine hits the baseline and the validation alike.
        baseline, with_repo, without_repo = [], [], []
        for _ in range(args.rounds):
            baseline.append(elapsed_ms(lambda: json.loads(raw)))
            with_repo.append(elapsed_ms(lambda: validate_plan(raw, repo=repo)))
            without_repo.append(elapsed_ms(lambda: validate_plan(raw)))
    report(
        "plan",
        tasks=args.tasks,
        plan_kib=round(len(raw) / 1024, 1),
        rounds=args.rounds,
        validate_ms_p50=round(statistics.median(with_repo), 3),
        validate_ms_p99=round(sorted(with_repo)[max(0, int(len(with_repo) * 0.99) - 1)], 3),
        no_repo_ms_p50=round(statistics.median(without_repo), 3),
        json_loads_ms_p50=round(statistics.median(baseline), 3),
    )


if __name__ == "__main__":
    main()
