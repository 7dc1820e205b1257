"""numerusctl: the thin control client of numerusd.

It speaks only the shared protocol (`numerusd.protocol`) over NATS: requests on `numerus.cmd.<verb>`, and
JetStream's ordered consumers to follow jobs, and an ephemeral pull consumer to audit their history. `cli.py`
holds the commands, `connection.py` finding and talking to the daemon, `render.py` the text a person reads.
"""
