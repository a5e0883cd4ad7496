"""reckpt's reference trainer: a TorchRec DLRM-style recommender on Parquet data.

Built on reckpt's public API only; ``reckpt train`` / ``eval`` / ``export`` / ``predict`` /
``make-data`` drive it (see :mod:`reckpt.cli`).
"""
