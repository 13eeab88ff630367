"""The cluster runtime: one Ray node per card, the local Ray cluster `zit up` starts, simulated fleets as Ray clusters
in one process. Ray, no Serve."""
