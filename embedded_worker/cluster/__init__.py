"""Remote device workers on a Ray cluster (issue 10): imported only when `cluster.address` is set."""
