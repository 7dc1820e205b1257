"""numerusctl: the thin control client of numerusd.

It speaks only the shared protocol (`numerusd.protocol`) over NATS: requests on `numerus.cmd.<verb>`, and
JetStream ordered consumers to follow jobs and to audit their history; it imports nothing else of numerusd.
`cli.py` holds the commands, `connection.py` finding and talking to the daemon, `feed.py` reading the streams,
`render.py` and `render_events.py` the text a person reads.
"""
