"""Writing a checkpoint: the save engine (parts, plan, manifest, commit), the async saver,
host copies and fork snapshots. Internal; the public entry is :func:`reckpt.save_model`.
"""
