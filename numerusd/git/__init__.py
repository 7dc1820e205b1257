"""Git for Numerus: a job's integration branch, one worktree per task, a task's real diff, merges in order.

Branch layout (docs/git.md says more):

    numerus/<job>.integration      the job's integration branch, created from the user's HEAD at job start
    numerus/<job>/<task>           one branch per task, checked out in its own worktree

All of them live in a bare mirror Numerus owns (`mirror.py`); the user's repository receives them as fetched refs.

Every step is built for "decide, append, then act": each function either is idempotent (creating the
integration branch, a worktree, committing a task's work) or can tell afterwards whether it already happened
(`merge_state`), so a crash between the intent event and the outcome event is repaired, never repeated blindly.
Nothing here touches the user's working tree, index or current branch.

The package, by concern (callers use the names re-exported here: `git.resolve(...)`, `git.GitError`):

    command.py     running the `git` binary: clean environment, no hooks, a timeout; `check_git()` at startup
    refs.py        branch names, `resolve`, the integration branch, refs moved only from where expected
    worktrees.py   a task's worktree, read-only checkouts of a commit, their removal; the repository's lock
    mirror.py      the bare mirror Numerus owns per user repository; results reach the user as fetched refs
    changes.py     `commit_work` (a task's work and its real diff), `uncommitted` (a user's working tree)
    merge.py       `merge_task` into the integration branch, `merge_state` after a crash
    result.py      a job's result: its diff (bounded), a user's branch moved to it, pushed
    errors.py      the GitError family

This package is the one place where failures of git become `GitError` (a failed command, in `command.py`):

    GitError(NumerusError)   a git command failed: `command`, `returncode`, the end of `stderr`, `cwd`
    ├── RefMoved             a ref was not at the value the caller expected; nothing was changed
    ├── BranchCheckedOut     refusing to move a branch that a worktree has checked out
    ├── BaseNotAncestor      a task's HEAD no longer descends from the commit its worktree started from
    ├── NotFastForward       a user's branch holds commits the result does not: it is not moved
    └── UncommittedWork      moving a checked-out branch would change files with the user's uncommitted work
"""

from numerusd.git.changes import GITLINK_MODE, SYMLINK_MODE, Change, ChangeKind, Work, commit_work, uncommitted
from numerusd.git.command import MINIMUM_VERSION, NUMERUS_EMAIL, NUMERUS_NAME, TIMEOUT, check_git
from numerusd.git.errors import BaseNotAncestor, BranchCheckedOut, GitError, NotFastForward, RefMoved, UncommittedWork
from numerusd.git.merge import (
    Conflict,
    Done,
    Merged,
    MergeResult,
    MergeState,
    Moved,
    NotStarted,
    merge_state,
    merge_task,
)
from numerusd.git.mirror import check_published, mirror_path, prepare_mirror, publish
from numerusd.git.refs import (
    Branch,
    accepted_branch,
    create_integration_branch,
    integration_branch,
    resolve,
    task_branch,
    task_branches,
)
from numerusd.git.result import (
    DiffText,
    Taken,
    bring,
    check_branch_name,
    check_remote,
    current_branch,
    diff,
    push,
    take,
)
from numerusd.git.worktrees import (
    Worktree,
    create_checkout,
    create_worktree,
    delete_branch,
    move_checkout,
    move_worktree,
    remove_checkout,
    remove_worktree,
)

__all__ = [
    "GITLINK_MODE",
    "MINIMUM_VERSION",
    "NUMERUS_EMAIL",
    "NUMERUS_NAME",
    "SYMLINK_MODE",
    "TIMEOUT",
    "BaseNotAncestor",
    "Branch",
    "BranchCheckedOut",
    "Change",
    "ChangeKind",
    "Conflict",
    "DiffText",
    "Done",
    "GitError",
    "MergeResult",
    "MergeState",
    "Merged",
    "Moved",
    "NotFastForward",
    "NotStarted",
    "RefMoved",
    "Taken",
    "UncommittedWork",
    "Work",
    "Worktree",
    "accepted_branch",
    "bring",
    "check_branch_name",
    "check_git",
    "check_published",
    "check_remote",
    "commit_work",
    "create_checkout",
    "create_integration_branch",
    "create_worktree",
    "current_branch",
    "delete_branch",
    "diff",
    "integration_branch",
    "merge_state",
    "merge_task",
    "mirror_path",
    "move_checkout",
    "move_worktree",
    "prepare_mirror",
    "publish",
    "push",
    "remove_checkout",
    "remove_worktree",
    "resolve",
    "take",
    "task_branch",
    "task_branches",
    "uncommitted",
]
