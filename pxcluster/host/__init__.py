"""The host layer: a volume as a block device and a filesystem on the attach node's host.

One module per job:
- `errors`: what can go wrong, one typed error each.
- `proc`: running a host tool with a timeout, its failure as one line.
- `registry`: what is mapped where on this host, persisted under a state directory so that
  `device list` and re-establishment after a restart know it.
- `mapper`: a block device for an NBD URI, through the kernel NBD client where the host has it,
  else through nbdfuse (libnbd) running nbdkit's retry filter, plus a loop device.
- `fs`: blkid, mkfs, mount, unmount, fsfreeze.
- `cluster`: the cluster side (attach here, take over from a dead node, detach).
- `lifecycle`: map, unmap, mount, unmount: the steps above in order, undone on failure.
- `commands`: the click commands (`volume map|unmap|mount|unmount`, `device list`).
"""
