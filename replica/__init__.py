"""Replica side of pxcluster: the chunk store on a disk, the replica server and its client.

Nothing here imports `pxcluster` or `membership`.
"""
