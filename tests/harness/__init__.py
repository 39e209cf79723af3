"""Real parts for tests: an etcd server, node processes, NBD client tools."""
