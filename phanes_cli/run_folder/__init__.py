"""The run folder's format, which `phanes screen` writes and `phanes stats` and `phanes report` read.

`layout` where a run puts things, `bids_naming` the `--layout bids` names, `schemas` the Parquet schemas and
metadata, `failures` why a volume failed, `commit` the commit protocol (done markers, failure rows),
`consolidate` part files into the three tables.
"""
