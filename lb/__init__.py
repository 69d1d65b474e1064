"""varstack-lb: the asyncio Layer-4 round-robin TCP proxy in front of the service replicas."""
