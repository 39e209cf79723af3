"""Cluster membership and state through etcd. Imports neither `replica` nor `pxcluster`."""
