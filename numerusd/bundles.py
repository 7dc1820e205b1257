"""Git bundles on the bus: how a job's repository reaches a remote worker and how a task's commits come back.

A remote worker shares nothing with the daemon but NATS, so commits travel as git bundles in the JetStream object
store `NUMERUS_BUNDLES` (`protocol.work.BUNDLES_BUCKET`):

- going out, a task's base: `base/<job>/<root>.bundle` holds the whole history up to the job's first base `root`,
  made once per job; `base/<job>/<root>..<base>.bundle` holds what a later base added to it. A worker keeps one
  bare repository per job (its cache) and fetches only the bundles whose tip it lacks (`offer_base`,
  `fetch_base`).
- coming back, a task's commits: one bundle of `base..commit` with one ref (`send_result`), which the daemon
  fetches into its mirror only after checking it (`receive_result`): one ref, the commit announced, applying to
  the mirror (its prerequisites there), descending from base with no unrelated history. What a worker sends is
  untrusted (its agent made the commits): git runs through `numerusd.git.command` (no hooks, clean
  environment), nothing is checked out, every commit id given to git is checked to be one (no option, no range),
  a bundle larger than MAX_BUNDLE_BYTES is refused before it is read, and a refused bundle leaves no ref behind.

Objects are streamed through temporary files (in `tmp` when the caller gives one), never held whole in memory.
Errors are `BundleError`, one line; a NATS server that cannot be reached stays `NatsUnavailable`/`StoreError`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import secrets
import tempfile
import weakref
from pathlib import Path

import nats.errors
import nats.js.errors
from nats.js.api import ObjectInfo, ObjectMeta, ObjectMetaOptions, StorageType
from nats.js.client import JetStreamContext
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, VALID_KEY_RE, ObjectStore

from numerusd.errors import NumerusError
from numerusd.git.command import Output, git
from numerusd.git.errors import GitError
from numerusd.protocol.work import BUNDLES_BUCKET
from numerusd.streams import ensure_object_store, jetstream_errors

log = logging.getLogger(__name__)

#: No bundle larger than this is made, uploaded or downloaded: a runaway agent (or a hostile worker) cannot fill
#: the daemon's disk through a result, and a repository this large wants another way to reach its workers.
MAX_BUNDLE_BYTES = 2 << 30
#: The object store's chunk: nats-py publishes chunks one at a time, each awaiting its acknowledgement, so
#: larger chunks mean fewer round trips (its default, 128 KiB, made a 50 MB upload ~400 of them). Kept under the
#: server's max_payload (the embedded server's is 8 MiB, nats-server's default 1 MiB).
CHUNK_BYTES = 1 << 20
#: A download waiting this long for its next chunk gives up (an object whose chunks were purged under it).
STALL_S = 30.0
#: Where fetched commits are kept: in a worker's cache, a ref per fetched base (so they survive a gc); in the
#: daemon's mirror, a result's ref only while it is being checked.
CACHE_REFS = "refs/numerus/bases/"
INCOMING_REFS = "refs/numerus/incoming/"
#: A bundle is made from a temporary ref under this prefix (git bundles refs, not bare commits).
OUTGOING_REFS = "refs/numerus/outgoing/"

_SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")
#: The refs a bundle of ours holds (`OUTGOING_REFS`): a refspec is built from the name, so no `:`, `+`, space.
_REF = re.compile(r"refs/[A-Za-z0-9_][A-Za-z0-9_./-]*")
#: Fetched objects checked by fsck where this git applies it to bundles (2.39 does not: its unbundle only checks
#: the pack and the prerequisites); the daemon's checkouts refuse the paths fsck warns of (`.git`, `..`) anyway.
_FSCK = ("-c", "transfer.fsckObjects=true", "-c", "fetch.fsckObjects=true")


class BundleError(NumerusError):
    """A bundle could not be made, sent, fetched, or was refused (a result that is not what was announced)."""

    code = "bundle"


async def ensure_bucket(js: JetStreamContext, *, replicas: int = 1) -> ObjectStore:
    """The object store NUMERUS_BUNDLES, created with `replicas` when missing (idempotent, like `ensure_kv`); an
    existing one is brought to `replicas` in place."""
    return await ensure_object_store(
        js,
        BUNDLES_BUCKET,
        replicas=replicas,
        storage=StorageType.FILE,  # on disk: a bundle outlives a server restart, as the job does
        description="Numerus: git bundles to and from remote workers",
    )


def base_objects(job: str, root: str, base: str) -> tuple[str, ...]:
    """The objects a worker fetches, in order, to hold `base`: the job's full history up to `root`, and when base
    is not root what base adds to it."""
    full = f"base/{job}/{root}.bundle"
    return (full,) if base == root else (full, f"base/{job}/{root}..{base}.bundle")


def result_object(job: str, task: str, attempt: int) -> str:
    """The object one attempt's commits come back as (removed with the job by `remove_job`)."""
    return f"result/{job}/{task}-{attempt}.bundle"


#: One upload at a time per object in this process: a second `put` of the same name would purge the chunks a
#: worker may be reading. A lock lives while a caller holds or awaits it.
_offering: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


async def offer_base(
    store: ObjectStore, repo: Path, job: str, root: str, base: str, *, tmp: Path | None = None
) -> tuple[str, ...]:
    """Make and upload the bundles `base_objects` names from `repo` (the daemon's mirror), each only when the
    bucket does not hold it yet; their names, to be fetched in order."""
    _check_sha(root, "root")
    _check_sha(base, "base")
    names = base_objects(job, root, base)
    for name, since, tip in zip(names, (None, root), (root, base), strict=False):
        lock = _offering.setdefault(name, asyncio.Lock())
        async with lock:
            if await _info(store, name) is not None:
                continue
            with tempfile.TemporaryDirectory(dir=tmp, prefix="numerus-bundle-") as scratch:
                bundle = Path(scratch) / "out.bundle"
                await _create(repo, bundle, tip, since)
                await _upload(store, name, bundle)
    return names


async def fetch_base(
    store: ObjectStore, cache: Path, names: tuple[str, ...], base: str, *, tmp: Path | None = None
) -> None:
    """Bring `base` into `cache`, a bare repository kept per job (made if missing): each bundle of `names` whose
    tip the cache lacks is downloaded and fetched (git checks its prerequisites are there); BundleError when base
    is still missing afterwards."""
    _check_sha(base, "base")
    if not (cache / "HEAD").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        await _git(f"cannot make the cache {cache}", cache, "init", "--bare", "-q")
    for name in names:
        tip = _tip(name)
        if tip is not None and await _has_commit(cache, tip):
            continue
        with tempfile.TemporaryDirectory(dir=tmp, prefix="numerus-bundle-") as scratch:
            bundle = Path(scratch) / "in.bundle"
            await _download(store, name, bundle)
            ref, sha = await _one_head(cache, bundle, name, tip)
            await _git(
                f"bundle {name} does not apply to {cache}",
                cache,
                *_FSCK,
                "fetch",
                "--no-tags",
                "--no-write-fetch-head",
                "--no-auto-gc",
                "--no-recurse-submodules",
                "--quiet",
                str(bundle),
                f"+{ref}:{CACHE_REFS}{sha}",
            )
    if not await _has_commit(cache, base):
        raise BundleError(f"base {base} is not in {cache} after fetching {', '.join(names) or 'no bundle'}")


async def send_result(
    store: ObjectStore, repo: Path, name: str, commit: str, base: str, *, tmp: Path | None = None
) -> None:
    """Upload a bundle of `base..commit`, with one ref, from `repo` as `name`.

    `repo` is best the worker's cache, where a worktree added from it keeps its commits: git is then never pointed
    at a worktree whose `.git` the agent could have rewritten to name another repository."""
    _check_sha(commit, "commit")
    _check_sha(base, "base")
    if commit == base:
        raise BundleError(f"nothing to send as {name}: commit {commit} is the base itself")
    with tempfile.TemporaryDirectory(dir=tmp, prefix="numerus-bundle-") as scratch:
        bundle = Path(scratch) / "out.bundle"
        await _create(repo, bundle, commit, base)
        await _upload(store, name, bundle)


async def receive_result(
    store: ObjectStore, mirror: Path, name: str, base: str, commit: str, *, tmp: Path | None = None
) -> None:
    """Fetch the result bundle `name` into `mirror`, after checking it is what a worker announced: one ref, at
    `commit`; its prerequisites in the mirror; `base` an ancestor of `commit` and every commit between them a
    descendant of base. BundleError (one line) otherwise. The commit's objects stay in the mirror; no ref does."""
    _check_sha(commit, "commit")
    _check_sha(base, "base")
    if not await _has_commit(mirror, base):
        raise BundleError(f"base {base} of {name} is not in the mirror")
    with tempfile.TemporaryDirectory(dir=tmp, prefix="numerus-bundle-") as scratch:
        bundle = Path(scratch) / "in.bundle"
        await _download(store, name, bundle)
        ref, _ = await _one_head(mirror, bundle, name, commit)
        await _git(f"result {name} does not apply to the mirror", mirror, "bundle", "verify", "-q", str(bundle))
        incoming = f"{INCOMING_REFS}{secrets.token_hex(8)}"
        try:
            await _git(
                f"result {name} could not be fetched",
                mirror,
                *_FSCK,
                "fetch",
                "--no-tags",
                "--no-write-fetch-head",
                "--no-auto-gc",
                "--no-recurse-submodules",
                "--quiet",
                str(bundle),
                f"{ref}:{incoming}",
            )
            await _check_descends(mirror, name, incoming, base, commit)
        finally:
            await _git(f"cannot remove {incoming}", mirror, "update-ref", "-d", incoming)


async def remove_job(store: ObjectStore, job: str) -> None:
    """Delete every object of `job` (its bases and results), best effort: what cannot be deleted now is left."""
    prefixes = (f"base/{job}/", f"result/{job}/")
    try:
        with jetstream_errors(f"list {BUNDLES_BUCKET}"):
            try:
                objects = await store.list(ignore_deletes=True)
            except nats.js.errors.NotFoundError:  # what nats-py says of an empty bucket
                return
    except NumerusError as e:
        log.warning("the bundles of job %s are left in %s: %s", job, BUNDLES_BUCKET, e.message)
        return
    for info in objects:
        if info.name.startswith(prefixes):
            try:
                with jetstream_errors(f"delete {info.name}"):
                    await store.delete(info.name)
            except NumerusError as e:
                log.warning("bundle %s is left in %s: %s", info.name, BUNDLES_BUCKET, e.message)


# --- making and checking bundles ------------------------------------------------------------------------------


async def _create(repo: Path, bundle: Path, tip: str, since: str | None) -> None:
    """`git bundle create` of `since..tip` (everything up to tip when since is None) into `bundle`, through a
    temporary ref (git bundles refs only) removed afterwards; BundleError when the result is too large."""
    ref = f"{OUTGOING_REFS}{secrets.token_hex(8)}"
    await _git(f"{tip} is not a commit of {repo}", repo, "update-ref", ref, f"{tip}^{{commit}}")
    try:
        revisions = ref if since is None else f"{since}..{ref}"
        await _git(f"cannot bundle {revisions} of {repo}", repo, "bundle", "create", "-q", str(bundle), revisions)
    finally:
        await _git(f"cannot remove {ref}", repo, "update-ref", "-d", ref)
    size = bundle.stat().st_size
    if size > MAX_BUNDLE_BYTES:
        raise BundleError(f"the bundle of {tip} is {_mib(size)}, over the limit of {_mib(MAX_BUNDLE_BYTES)}")


async def _one_head(repo: Path, bundle: Path, name: str, expected: str | None) -> tuple[str, str]:
    """The one ref of `bundle` and its commit, which must be `expected` when given; BundleError otherwise."""
    listed = (await _git(f"{name} is not a git bundle", repo, "bundle", "list-heads", str(bundle))).text()
    heads = [line.split(" ", 1) for line in listed.splitlines() if line]
    if len(heads) != 1 or len(heads[0]) != 2:
        raise BundleError(f"{name} holds {len(heads)} refs where one was expected")
    sha, ref = heads[0]
    if expected is not None and sha != expected:
        raise BundleError(f"{name} holds commit {sha[:40]}, not the one announced ({expected})")
    if not _REF.fullmatch(ref) or ".." in ref:
        raise BundleError(f"{name} holds a ref with an unusable name")
    return ref, sha


async def _check_descends(mirror: Path, name: str, ref: str, base: str, commit: str) -> None:
    """`ref` is `commit`, base is its ancestor, and every commit of base..commit descends from base."""
    fetched = (await _git(f"{ref} is not in the mirror", mirror, "rev-parse", "--verify", "-q", ref)).text()
    if fetched != commit:
        raise BundleError(f"{name} brought commit {fetched}, not the one announced ({commit})")
    ancestor = await git(mirror, "merge-base", "--is-ancestor", base, commit, ok=(0, 1))
    if ancestor.returncode != 0:
        raise BundleError(f"{name}: commit {commit} does not descend from base {base}")
    counting = f"cannot count the commits of {name}"
    between = (await _git(counting, mirror, "rev-list", "--count", f"{base}..{commit}")).text()
    on_path = (await _git(counting, mirror, "rev-list", "--count", "--ancestry-path", f"{base}..{commit}")).text()
    if between != on_path:
        unrelated = int(between) - int(on_path)
        raise BundleError(f"{name}: {unrelated} of its commits do not descend from base {base} (unrelated history)")


async def _has_commit(repo: Path, sha: str) -> bool:
    found = await git(repo, "cat-file", "-e", f"{sha}^{{commit}}", ok=(0, 1, 128))
    return found.returncode == 0


async def _git(doing: str, cwd: Path, *args: str) -> Output:
    """`git(cwd, *args)`, its failure a BundleError saying what could not be done and git's last line."""
    try:
        return await git(cwd, *args)
    except GitError as e:
        last = str(e.fields.get("stderr", "")).strip().splitlines()
        raise BundleError(f"{doing}: {last[-1] if last else e.message}") from e


# --- the object store -----------------------------------------------------------------------------------------


async def _info(store: ObjectStore, name: str) -> ObjectInfo | None:
    """The object `name`'s metadata, or None when the bucket does not hold it."""
    if not VALID_KEY_RE.match(name):
        raise BundleError(f"{name!r} is not a usable object name")
    with jetstream_errors(f"look up {name} in {BUNDLES_BUCKET}"):
        try:
            return await store.get_info(name)
        except nats.js.errors.ObjectNotFoundError:
            return None


async def _upload(store: ObjectStore, name: str, bundle: Path) -> None:
    """Stream the file `bundle` into the object `name`."""
    chunk = min(CHUNK_BYTES, store._js._nc.max_payload)  # nats-py keeps the connection on the store only
    meta = ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=chunk))
    with bundle.open("rb") as source, jetstream_errors(f"upload {name} to {BUNDLES_BUCKET}"):
        await store.put(name, source, meta=meta)


async def _download(store: ObjectStore, name: str, into: Path) -> None:
    """Stream the object `name` into the file `into`, refusing one over MAX_BUNDLE_BYTES and checking its digest.

    nats-py's `ObjectStore.get` cannot be bounded nor timed out without leaking its subscription, so the chunks
    are read here, the way it reads them: an ordered consumer on the object's chunk subject.
    """
    info = await _info(store, name)
    if info is None:
        raise BundleError(f"no object {name} in {BUNDLES_BUCKET}")
    declared = info.size or 0
    if declared > MAX_BUNDLE_BYTES:
        raise BundleError(f"{name} is {_mib(declared)}, over the limit of {_mib(MAX_BUNDLE_BYTES)}")
    if not info.nuid or info.is_link():
        raise BundleError(f"{name} is not a plain object")
    digest = hashlib.sha256()
    received = 0
    with into.open("wb") as sink:
        if declared > 0:
            js = store._js  # as above: the store's connection
            subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=BUNDLES_BUCKET, obj=info.nuid)
            with jetstream_errors(f"download {name} from {BUNDLES_BUCKET}"):
                subscription = await js.subscribe(subject, ordered_consumer=True)
                try:
                    while True:
                        try:
                            message = await subscription.next_msg(timeout=STALL_S)
                        except nats.errors.TimeoutError:
                            raise BundleError(f"{name} stopped arriving after {_mib(received)}") from None
                        received += len(message.data)
                        if received > declared:
                            raise BundleError(f"{name} is larger than the {_mib(declared)} it declares")
                        digest.update(message.data)
                        await asyncio.to_thread(sink.write, message.data)
                        if message.metadata.num_pending == 0:
                            break
                finally:
                    await subscription.unsubscribe()
    if received != declared:
        raise BundleError(f"{name} is {_mib(received)} where it declares {_mib(declared)}")
    expected = (info.digest or "").partition("=")[2]
    if base64.urlsafe_b64encode(digest.digest()).decode() != expected:
        raise BundleError(f"{name} does not match its digest (damaged in the store)")


# --- small helpers --------------------------------------------------------------------------------------------


def _check_sha(value: str, what: str) -> None:
    """A commit named by its full hex id: nothing else goes to git as a revision (no option, no range)."""
    if not _SHA.fullmatch(value):
        raise BundleError(f"{what} {value[:80]!r} is not a full commit id")


def _tip(name: str) -> str | None:
    """The commit a base bundle named by `base_objects` brings (None for another name: it is always fetched)."""
    stem = name.rsplit("/", 1)[-1].removesuffix(".bundle")
    tip = stem.rpartition("..")[2]
    return tip if _SHA.fullmatch(tip) else None


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"
