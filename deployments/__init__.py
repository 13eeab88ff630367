"""The Ray Serve application: HTTP ingress, dispatch and routing, one Generator deployment per VRAM tier, the fleet
registry and the metrics."""
