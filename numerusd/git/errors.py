"""What goes wrong with git, as Numerus reports it: the `GitError` family (drawn in `numerusd.git`'s docstring).

`numerusd.git.command` is the one place where a failed git command becomes a `GitError`; the other modules of the
package raise the narrower classes when they find a repository in a state they will not work with.
"""

from __future__ import annotations

from numerusd.errors import NumerusError


class GitError(NumerusError):
    """A git command failed, or a repository is not in a state Numerus can work with."""

    code = "git"


class RefMoved(GitError):
    """A ref was not at the value the caller expected (somebody else moved it); nothing was changed."""

    code = "git_ref_moved"


class BranchCheckedOut(GitError):
    """Refusing to move a branch that is checked out in a worktree: its index and files would go stale."""

    code = "git_branch_checked_out"


class BaseNotAncestor(GitError):
    """A task's HEAD does not descend from its base commit (the agent rewrote history or switched branches)."""

    code = "git_base_not_ancestor"


class NotFastForward(GitError):
    """A branch holds commits the commit it was to be moved to does not: moving it would lose them; nothing changed."""

    code = "git_not_fast_forward"


class UncommittedWork(GitError):
    """Moving a checked-out branch would change files holding the user's uncommitted work (`paths`); nothing
    changed."""

    code = "git_uncommitted_work"
