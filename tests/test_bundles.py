"""Git bundles through NUMERUS_BUNDLES, against a real nats-server and real git: a job's base out to a worker's
cache, a task's commit back into the daemon's mirror, and results a hostile worker could send refused in one line
with the mirror's refs untouched."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js.object_store import ObjectStore

from numerusd import bundles
from numerusd.bundles import BundleError
from numerusd.protocol.work import BUNDLES_BUCKET

AUTHOR = ("-c", "user.name=t", "-c", "user.email=t@example.invalid")


def git(repo: Path, *args: str) -> str:
    """What `git -C repo ARGS...` prints, stripped (it must succeed)."""
    done = subprocess.run(["git", "-C", str(repo), *AUTHOR, *args], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def commit(repo: Path, path: str, text: str, message: str = "change") -> str:
    """Write `text` to `path` in the worktree `repo`, commit it; the new commit."""
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    (repo / path).write_text(text)
    git(repo, "add", path)
    git(repo, "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD")


def refs(repo: Path) -> str:
    return git(repo, "for-each-ref")


@pytest.fixture
async def store(nc: Client) -> ObjectStore:
    return await bundles.ensure_bucket(nc.jetstream())


@pytest.fixture
def user_repo(tmp_path: Path) -> Path:
    """The user's repository: two commits on main."""
    repo = tmp_path / "user"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    commit(repo, "README.md", "# project\n", "init")
    commit(repo, "src/app.py", "print('hello')\n", "app")
    return repo


@pytest.fixture
def mirror(tmp_path: Path, user_repo: Path) -> Path:
    """The daemon's bare mirror of the user's repository."""
    path = tmp_path / "mirror.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(user_repo), str(path)], check=True)
    return path


def worktree_of(cache: Path, base: str, where: Path) -> Path:
    """A worker's separate working copy of `base`, cloned from its cache."""
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(cache), str(where)], check=True, capture_output=True)
    git(where, "checkout", "-q", "--detach", base)
    return where


async def test_round_trip_brings_the_workers_commit_into_the_mirror_with_its_tree(
    store: ObjectStore, mirror: Path, tmp_path: Path
) -> None:
    root = git(mirror, "rev-parse", "main")
    names = await bundles.offer_base(store, mirror, "J1", root, root)
    assert names == (f"base/J1/{root}.bundle",)

    cache = tmp_path / "worker" / "J1.git"
    await bundles.fetch_base(store, cache, names, root)
    work = worktree_of(cache, root, tmp_path / "worker" / "task")
    assert (work / "src" / "app.py").read_text() == "print('hello')\n"
    done = commit(work, "src/app.py", "print('hello, world')\n", "task: greet the world")

    before = refs(mirror)
    name = bundles.result_object("J1", "T1", 1)
    await bundles.send_result(store, work, name, done, root)
    await bundles.receive_result(store, mirror, name, root, done)

    assert git(mirror, "rev-parse", f"{done}^{{tree}}") == git(work, "rev-parse", "HEAD^{tree}")
    assert git(mirror, "show", f"{done}:src/app.py") == "print('hello, world')"
    assert refs(mirror) == before  # the temporary ref is gone: the daemon decides what points at the commit


async def test_an_incremental_base_is_fetched_alone_into_a_cache_holding_root(
    store: ObjectStore, mirror: Path, user_repo: Path, tmp_path: Path
) -> None:
    root = git(mirror, "rev-parse", "main")
    cache = tmp_path / "cache.git"
    await bundles.fetch_base(store, cache, await bundles.offer_base(store, mirror, "J1", root, root), root)

    commit(user_repo, "src/app.py", "print('merged')\n", "a merged task")
    base = commit(user_repo, "NEWS", "one\n", "another")
    git(mirror, "fetch", "-q", str(user_repo), "main:main")
    names = await bundles.offer_base(store, mirror, "J1", root, base)
    assert names == (f"base/J1/{root}.bundle", f"base/J1/{root}..{base}.bundle")

    await store.delete(names[0])  # the cache holds root: only the second bundle may be downloaded
    await bundles.fetch_base(store, cache, names, base)
    assert git(cache, "show", f"{base}:src/app.py") == "print('merged')"

    empty = tmp_path / "empty.git"
    with pytest.raises(BundleError, match=re.escape(f"no object base/J1/{root}.bundle")):
        await bundles.fetch_base(store, empty, names, base)


async def test_offering_a_base_twice_uploads_it_once(store: ObjectStore, mirror: Path) -> None:
    root = git(mirror, "rev-parse", "main")
    (name,) = await bundles.offer_base(store, mirror, "J1", root, root)
    first = await store.get_info(name)
    published = (await store.status()).stream_info.state.last_seq  # every message ever stored, chunks and meta
    assert await bundles.offer_base(store, mirror, "J1", root, root) == (name,)
    assert (await store.get_info(name)).nuid == first.nuid
    assert (await store.status()).stream_info.state.last_seq == published

    # Tasks of a job offered at the same moment: one of them uploads, the others wait and find it there.
    offers = [bundles.offer_base(store, mirror, "J2", root, root) for _ in range(3)]
    assert await asyncio.gather(*offers) == [(f"base/J2/{root}.bundle",)] * 3
    assert (await store.status()).stream_info.state.last_seq == 2 * published


async def test_the_bucket_is_made_once(nc: Client, store: ObjectStore) -> None:
    again = await bundles.ensure_bucket(nc.jetstream())
    assert (await again.status()).bucket == BUNDLES_BUCKET


async def test_remove_job_deletes_its_bases_and_results_and_nothing_else(
    store: ObjectStore, mirror: Path, tmp_path: Path
) -> None:
    root = git(mirror, "rev-parse", "main")
    for job in ("J1", "J2"):
        await bundles.offer_base(store, mirror, job, root, root)
    await store.put(bundles.result_object("J1", "T1", 1), b"result")
    await bundles.remove_job(store, "J1")
    left = sorted(info.name for info in await store.list(ignore_deletes=True))
    assert left == [f"base/J2/{root}.bundle"]
    await bundles.remove_job(store, "J1")  # nothing left of it: still fine


# --- what a hostile worker could send -------------------------------------------------------------------------


@pytest.fixture
async def worker(store: ObjectStore, mirror: Path, tmp_path: Path) -> tuple[Path, str]:
    """A worker's working copy of the job's base, fetched through the bucket; (its path, the base)."""
    root = git(mirror, "rev-parse", "main")
    cache = tmp_path / "worker" / "J1.git"
    await bundles.fetch_base(store, cache, await bundles.offer_base(store, mirror, "J1", root, root), root)
    return worktree_of(cache, root, tmp_path / "worker" / "task"), root


async def refused(store: ObjectStore, mirror: Path, bundle: bytes, base: str, announced: str, why: str) -> None:
    """The result `bundle`, announced as `announced`, is refused with one line matching `why`; no ref moved."""
    before = refs(mirror)
    name = bundles.result_object("J1", "T1", 1)
    await store.put(name, bundle)
    with pytest.raises(BundleError, match=why) as refusal:
        await bundles.receive_result(store, mirror, name, base, announced)
    assert "\n" not in str(refusal.value)
    assert refs(mirror) == before


def bundle_of(repo: Path, *revisions: str) -> bytes:
    path = repo.parent / "made.bundle"
    git(repo, "bundle", "create", "-q", str(path), *revisions)
    return path.read_bytes()


async def test_a_result_with_two_refs_is_refused(store: ObjectStore, mirror: Path, worker: tuple[Path, str]) -> None:
    work, base = worker
    git(work, "checkout", "-q", "-b", "one")
    done = commit(work, "a", "a\n")
    git(work, "checkout", "-q", "-b", "two", base)
    commit(work, "b", "b\n")
    await refused(store, mirror, bundle_of(work, "one", "two", f"^{base}"), base, done, "holds 2 refs")


async def test_a_result_whose_ref_is_another_commit_is_refused(
    store: ObjectStore, mirror: Path, worker: tuple[Path, str]
) -> None:
    work, base = worker
    git(work, "checkout", "-q", "-b", "task")
    announced = commit(work, "a", "a\n")
    commit(work, "b", "b\n")
    await refused(store, mirror, bundle_of(work, f"{base}..task"), base, announced, "not the one announced")


async def test_a_result_of_unrelated_history_is_refused(
    store: ObjectStore, mirror: Path, worker: tuple[Path, str], tmp_path: Path
) -> None:
    work, base = worker
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    git(stranger, "init", "-q", "-b", "main")
    foreign = commit(stranger, "evil.sh", "rm -rf /\n", "another root")
    await refused(store, mirror, bundle_of(stranger, "main"), base, foreign, "does not descend from base")

    # A merge of the task's work with the unrelated root: base is an ancestor, yet history came along.
    git(work, "checkout", "-q", "-b", "task")
    commit(work, "a", "a\n")
    git(work, "fetch", "-q", str(stranger), "main:stranger")
    git(work, "merge", "-q", "--allow-unrelated-histories", "-m", "merge", "stranger")
    merged = git(work, "rev-parse", "HEAD")
    await refused(store, mirror, bundle_of(work, f"{base}..task"), base, merged, "1 of its commits do not descend")


async def test_a_truncated_or_damaged_result_is_refused(
    store: ObjectStore, mirror: Path, worker: tuple[Path, str]
) -> None:
    work, base = worker
    git(work, "checkout", "-q", "-b", "task")
    commit(work, "data.txt", "".join(f"line {n}\n" for n in range(5000)))
    done = git(work, "rev-parse", "HEAD")
    whole = bundle_of(work, f"{base}..task")
    await refused(store, mirror, whole[: len(whole) // 2], base, done, "could not be fetched")
    damaged = bytearray(whole)
    for at in range(len(whole) - 200, len(whole) - 100):
        damaged[at] ^= 0xFF
    await refused(store, mirror, bytes(damaged), base, done, "could not be fetched")
    await refused(store, mirror, b"not a bundle\n", base, done, "is not a git bundle")


async def test_a_result_over_the_size_limit_is_refused_before_it_is_read(
    store: ObjectStore, mirror: Path, worker: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    work, base = worker
    git(work, "checkout", "-q", "-b", "task")
    done = commit(work, "a", "a\n")
    monkeypatch.setattr(bundles, "MAX_BUNDLE_BYTES", 64)
    await refused(store, mirror, bundle_of(work, f"{base}..task"), base, done, "over the limit of")


async def test_a_result_on_a_base_the_mirror_lacks_is_refused(
    store: ObjectStore, mirror: Path, worker: tuple[Path, str]
) -> None:
    work, _ = worker
    git(work, "checkout", "-q", "-b", "task")
    first = commit(work, "a", "a\n")
    done = commit(work, "b", "b\n")
    await refused(store, mirror, bundle_of(work, f"{first}..task"), first, done, "is not in the mirror")


async def test_a_base_bundle_that_is_not_what_its_name_says_is_refused(
    store: ObjectStore, mirror: Path, user_repo: Path, tmp_path: Path
) -> None:
    root = git(mirror, "rev-parse", "main")
    other = git(mirror, "rev-parse", "main~1")
    # What the bucket holds under root's name is the bundle of another commit (a broken or hostile store).
    git(user_repo, "branch", "older", "main~1")
    await store.put(f"base/J1/{root}.bundle", bundle_of(user_repo, "older"))
    cache = tmp_path / "cache.git"
    with pytest.raises(BundleError, match=f"holds commit {other}, not the one announced"):
        await bundles.fetch_base(store, cache, (f"base/J1/{root}.bundle",), root)
    assert refs(cache) == ""


async def test_ids_that_are_not_commits_never_reach_git(store: ObjectStore, mirror: Path) -> None:
    before = refs(mirror)
    root = git(mirror, "rev-parse", "main")
    for hostile in ("--upload-pack=touch /tmp/owned", "HEAD", f"{root}..main", root[:12]):
        with pytest.raises(BundleError, match="is not a full commit id"):
            await bundles.receive_result(store, mirror, "result/J1/T1-1.bundle", root, hostile)
    with pytest.raises(BundleError, match=re.escape("no object result/J1/T1-1.bundle")):
        await bundles.receive_result(store, mirror, "result/J1/T1-1.bundle", root, root)
    assert refs(mirror) == before
