"""Writing a checkpoint: what it holds (``contents``: the one assembly of a model's
checkpoint), the engine writing it in phases up to the commit (``pipeline``), the entry points
(``engine``: ``save_model``, ``save_checkpoint``, ``save_parts``), the async saver, host copies
and fork snapshots. Internal; the public entry is :func:`reckpt.save_model`.
"""
