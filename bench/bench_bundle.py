"""How fast a repository travels on the bus: a job's whole history to a worker and a task's commit back, as bundles.

    python bench/bench_bundle.py [--mb 50] [--commits 5] [--pairs 5] [--packed] [--chunk-kib 1024]

A generated repository of `--mb` MB (files of random bytes, so that nothing compresses away, in `--commits`
commits), mirrored bare as the daemon keeps it: its objects loose, as freshly committed, or with `--packed` in one
pack, as in a repository git has gc'ed (then git reuses the pack and makes a bundle ~20x faster, so what the bus
adds weighs more). Each pair times, in alternating order:

* the round trip (`numerusd.bundles`, against an embedded nats-server): `offer_base` of the whole history (bundle
  made, uploaded), `fetch_base` into an empty cache (downloaded, fetched), then a small task commit made in the
  cache (not timed) sent back with `send_result` and taken into the mirror with `receive_result` (downloaded,
  verified, fetched, checked);
* the baseline: `git clone --local --bare` of the mirror plus `git bundle create` of its whole history: what git
  itself needs to copy the repository and to pack it once.

Target (issue 17): the round trip against the baseline <= 2.0 (the median of the pairs' ratios).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Stopwatch, base_parser, connect, embedded_nats, report, run

from numerusd import bundles

AUTHOR = ("-c", "user.name=bench", "-c", "user.email=bench@example.invalid")


def git(repo: Path, *args: str, stdin: bytes | None = None) -> str:
    done = subprocess.run(["git", "-C", str(repo), *AUTHOR, *args], input=stdin, capture_output=True, check=True)
    return done.stdout.decode().strip()


def generate(where: Path, mb: int, commits: int, packed: bool) -> Path:
    """A bare mirror, made as the daemon makes its own, of a repository of about `mb` MB of random files added
    over `commits` commits: its objects loose, as freshly committed, or `packed` (`git repack -ad`)."""
    user = where / "user"
    user.mkdir()
    git(user, "init", "-q", "-b", "main")
    file_bytes = 64 << 10
    files = max(1, mb * 1_000_000 // file_bytes // commits)
    for c in range(commits):
        for f in range(files):
            path = user / f"part{c}" / f"{f:04d}.bin"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(os.urandom(file_bytes))
        git(user, "add", "-A")
        git(user, "commit", "-qm", f"part {c}")
    mirror = where / "mirror.git"
    subprocess.run(["git", "clone", "-q", "--bare", "--no-hardlinks", str(user), str(mirror)], check=True)
    shutil.rmtree(user)
    if packed:
        git(mirror, "repack", "-adq")
    return mirror


def task_commit(cache: Path, base: str) -> str:
    """A small commit on `base` made with plumbing in the bare cache (a task's change to one file)."""
    blob = git(cache, "hash-object", "-w", "--stdin", stdin=b"print('the task was here')\n")
    listing = git(cache, "ls-tree", base) + f"\n100644 blob {blob}\ttask.py\n"
    tree = git(cache, "mktree", stdin=listing.encode())
    return git(cache, "commit-tree", tree, "-p", base, "-m", "task")


def du_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


async def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--commits", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--packed", action="store_true", help="the mirror's objects in one pack, not loose")
    parser.add_argument("--chunk-kib", type=int, help="the object store's chunk size (numerusd.bundles.CHUNK_BYTES)")
    args = parser.parse_args()
    if args.chunk_kib:
        bundles.CHUNK_BYTES = args.chunk_kib << 10
    with tempfile.TemporaryDirectory(prefix="numerus-bench-bundle-") as tmp, embedded_nats() as server:
        where = Path(tmp)
        mirror = generate(where, args.mb, args.commits, args.packed)
        root = git(mirror, "rev-parse", "main")
        nc = await connect(server)
        store = await bundles.ensure_bucket(nc.jetstream())
        trips: list[dict[str, float]] = []
        baselines: list[dict[str, float]] = []

        async def round_trip(n: int) -> None:
            job, cache, scratch = f"bench{n}", where / f"cache{n}.git", where / f"scratch{n}"
            scratch.mkdir()
            with Stopwatch() as offer:
                names = await bundles.offer_base(store, mirror, job, root, root, tmp=scratch)
            with Stopwatch() as fetch:
                await bundles.fetch_base(store, cache, names, root, tmp=scratch)
            done = task_commit(cache, root)
            with Stopwatch() as send:
                await bundles.send_result(store, cache, f"result/{job}/t-1.bundle", done, root, tmp=scratch)
            with Stopwatch() as receive:
                await bundles.receive_result(store, mirror, f"result/{job}/t-1.bundle", root, done, tmp=scratch)
            trips.append(
                {
                    "offer": offer.seconds,
                    "fetch": fetch.seconds,
                    "send": send.seconds,
                    "receive": receive.seconds,
                    "total": offer.seconds + fetch.seconds + send.seconds + receive.seconds,
                }
            )
            await bundles.remove_job(store, job)
            shutil.rmtree(cache)
            shutil.rmtree(scratch)

        def baseline(n: int) -> None:
            clone, bundle = where / f"clone{n}.git", where / f"base{n}.bundle"
            with Stopwatch() as cloned:
                subprocess.run(["git", "clone", "-q", "--local", "--bare", str(mirror), str(clone)], check=True)
            with Stopwatch() as bundled:
                git(mirror, "bundle", "create", "-q", str(bundle), "main")
            baselines.append(
                {"clone": cloned.seconds, "bundle": bundled.seconds, "total": cloned.seconds + bundled.seconds}
            )
            shutil.rmtree(clone)
            bundle.unlink()

        for n in range(args.pairs):
            if n % 2:
                baseline(n)
                await round_trip(n)
            else:
                await round_trip(n)
                baseline(n)
        await nc.close()
        repo_mb = du_mb(mirror)
    ratios = [t["total"] / b["total"] for t, b in zip(trips, baselines, strict=True)]

    def median(rows: list[dict[str, float]], key: str) -> float:
        return round(statistics.median(row[key] for row in rows), 3)

    report(
        "bundle, the mirror packed" if args.packed else "bundle",
        repo_mb=round(repo_mb, 1),
        pairs=args.pairs,
        chunk_kib=bundles.CHUNK_BYTES >> 10,
        offer_s=median(trips, "offer"),
        fetch_s=median(trips, "fetch"),
        send_s=median(trips, "send"),
        receive_s=median(trips, "receive"),
        round_trip_s=median(trips, "total"),
        clone_s=median(baselines, "clone"),
        bundle_create_s=median(baselines, "bundle"),
        baseline_s=median(baselines, "total"),
        ratio=round(statistics.median(ratios), 3),
        ratio_spread=f"{min(ratios):.2f}-{max(ratios):.2f}",
    )


if __name__ == "__main__":
    run(main, base_parser("").parse_known_args()[0].loop)
