"""The terminal front end: the `idefics-bot` entry point and the local chat and task commands."""
