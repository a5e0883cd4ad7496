"""The commit protocol: the one state predicate every reader uses, prepare/commit/abort of a
save, deletion of what reckpt wrote (never anything else), the writer lock and reader leases.
Internal.
"""
