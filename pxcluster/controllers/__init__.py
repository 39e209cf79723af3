"""Reconcile loops run by the leader only: failover, repair, drains and schedules. Each is a
class with one `run_pass(pass_view)`; the runner (runner.py) calls them in turn while this node
holds the leader key, all on one `PassView` (view.py) of the cluster."""
