"""Replica counts per tier (application-level autoscaling policy and the fleet simulator)."""
