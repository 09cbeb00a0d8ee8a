"""Cohort screening at scale on Ray (`phanes screen`).

`engine.screen` composes the run: `options` (the flags), `session` (lock on OUT, Ray session), `plan`
(resume and actor planning), `dispatch` (the streaming loop and fault handling), `tasks` (the CPU stages:
decode, write), `actors` (the inference actor), `outputs` (layout, commit protocol, consolidation) and
`report` (progress display, JSON-lines log, run manifest).
"""
