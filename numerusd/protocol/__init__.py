"""The types both programs share: events, commands and replies, and how events are signed.

`numerusctl` imports this package and nothing else of the daemon. Nothing here does I/O.
"""
