"""torch.distributed.checkpoint on reckpt's storage: writer, safe reader, load planner and
direct item access. Internal.
"""
