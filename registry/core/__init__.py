"""The registry's pure core: errors, units, instance model, balancer, store.
No asyncio, no I/O; time comes from an injected clock."""
