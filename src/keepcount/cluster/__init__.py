"""Cluster tooling: the servers of a local cluster (etcd, ZooKeeper, HAProxy,
NGINX) as processes, keepcount nodes as processes, and the failure detector
that restarts them (DESIGN §4 "Cluster tooling").

The cluster tooling uses the coordinator and starts nodes as processes; a
node never imports it.
"""
