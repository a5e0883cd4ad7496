"""The commit protocol: the one state predicate every reader uses (``state``), a save's
prepare/commit/abort (``protocol.SaveCommit``), deletion of what reckpt wrote (never anything
else, ``removal``), the writer lock and reader leases. Internal.
"""
