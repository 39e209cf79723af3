"""Reconcile loops run by the leader only: failover and repair. Each is a class with one
`run_pass()`; the runner calls them while this node holds the leader key."""
