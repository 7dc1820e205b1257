"""The SQLite views: the event stream folded into tables an operator can query, rebuilt from the stream at will.

The stream is the truth; `views.sqlite3` is a cache that can be deleted at any time. The daemon writes it and never
reads it back (`status` is answered from the daemon's own fold). The parts:

* `schema`: the tables, and the layout version that drops and rebuilds them after an upgrade;
* `rows`: job and task states turned into rows, and the multi-row INSERTs that write a batch and its position;
* `fold`: a batch of stream messages opened, verified and folded in memory, with what is rejected and why;
* `database`: the file behind one thread that owns a plain `sqlite3` connection (sqlite3 errors translated);
* `projector`: follows the stream, committing each batch's rows with its stream position;
* `rebuild`: the whole stream replayed into a scratch file and swapped in (`numerusd rebuild`);
* `dump`: every view's rows in a stable order, which a rebuild must reproduce.

See docs/projections.md for the guarantees and the figures.
"""
