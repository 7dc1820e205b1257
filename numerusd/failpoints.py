"""Failpoints: named places where a test can make the daemon die, to prove what a crash there leaves behind.

`NUMERUS_FAILPOINTS=after-merge` makes `hit("after-merge")` end the process at once, as `kill -9` would, with
exit status 137: no cleanup, no flush, nothing recorded after that point. Unset (always, outside tests), `hit`
is one dictionary look-up. Like etcd's gofail or TiKV's fail-rs, without the dependency.
"""

from __future__ import annotations

import os

#: The failpoints armed for this process, read once at import.
ARMED = frozenset(filter(None, os.environ.get("NUMERUS_FAILPOINTS", "").split(",")))


def hit(name: str) -> None:
    """Die here, like `kill -9`, if the failpoint `name` is armed."""
    if name in ARMED:
        os._exit(137)
