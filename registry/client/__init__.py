"""For services: a small synchronous admin client and the heartbeating Sidecar."""
