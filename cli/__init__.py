"""The `zit` command, the top layer: it starts, plans, measures and drives everything below it."""
