"""The one storage layer: fsspec-backed :class:`~reckpt.storage.core.Storage`, error mapping,
retries, write-back and the debug hooks on every mutating operation. Internal.
"""
