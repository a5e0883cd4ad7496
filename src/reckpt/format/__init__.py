"""What lies on disk besides DCP's parts: manifest, checksums, verification, safe unpickling,
dataloader state, eval results, damage marks and the small records a save writes. Internal.
"""
