"""The fleet: which cards exist, which tier each belongs to, and what each can hold."""
