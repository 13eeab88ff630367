"""Replica counts per tier: the policy (pure), its Ray Serve adapters and the fleet simulator."""
