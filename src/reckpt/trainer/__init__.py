"""reckpt's reference trainer: a TorchRec DLRM-style recommender on Parquet data.

It saves, resumes, evaluates and exports through reckpt's public API (the manager,
discovery, the sub-packages' names) and, for serving, reads parts and dynamic tables through
the restore and dynamic layers directly. ``reckpt train`` / ``eval`` / ``export`` / ``predict`` /
``make-data`` drive it (see :mod:`reckpt.cli`).
"""
