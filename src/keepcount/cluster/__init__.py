"""Cluster tooling: the servers of a local cluster (etcd, ZooKeeper, Cassandra,
the Bigtable emulator, HAProxy, NGINX) as processes, keepcount nodes as
processes, and the supervisor that restarts them (DESIGN §4 "Cluster tooling").

Every process is a ``keepcount.process.ManagedProcess``.  The modules, lowest
first: ``processes`` (servers), ``balancer`` (the load balancer seam) with
``haproxy``, ``nginx`` and ``balancers`` (pick one by name); ``etcd``,
``zookeeper``, ``cassandra`` (with ``cassandra_config``, ``cql``),
``bigtable``; ``spec`` (what a cluster is made of), ``events``, ``launcher``,
``detector``, ``api`` and ``supervisor``; ``faults`` and ``partition``.

The cluster tooling uses the coordinator and starts nodes as processes; a
node never imports it.
"""
