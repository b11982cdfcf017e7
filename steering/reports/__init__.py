"""Reports: whole pipelines that measure and write documents.

Lives here: the claims report (`report`) and the precision gate (`precision_gate`).
May import: everything in `steering` but `commands`.
"""
