"""The Discord front end: the client, its slash commands (cogs), and the turning of Discord objects into the
pipeline's own types and back."""
