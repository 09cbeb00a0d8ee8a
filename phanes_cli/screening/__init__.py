"""Cohort screening at scale on Ray (`phanes screen`).

`engine` drives the run (streaming, resume, faults), `tasks` holds the CPU stages (decode, write),
`actors` the inference actor, `outputs` the output layout and commit protocol, `report` the progress
display, JSON-lines log and run manifest.
"""
