"""numerusd: the Numerus daemon, which keeps every state change as a signed event in NATS JetStream."""

__version__ = "0.1.0"
