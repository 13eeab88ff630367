"""The Ray Serve application: HTTP ingress, one Generator deployment per VRAM tier, the pipeline loader."""
