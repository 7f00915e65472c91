"""pipeline: the store, ingest, the Ray stage runner and the `alphaset` command line.

Owns everything every stage shares: store layout and manifest (`store`), fsspec atomic writes
(`fs`), safe image decoding (`images`), ingest sources (`ingest`), the shard-stage runner on Ray
(`stage`, `cluster`), and the CLI (`cli`).
"""

__version__ = "0.1.0"
