"""The application commands, as discord.py cogs the client loads as extensions in `setup_hook`.

    tasks    the guide's tasks: /caption /ask /classify /story /fewshot and the "Caption image" message menu
    channel  channel admin and the bot itself: /reset /settings /forget-me /status

`frame` holds what every command shares: deferring, the reply sink, one short message for every failure.
"""

EXTENSIONS = ("bot.discord_app.cogs.tasks", "bot.discord_app.cogs.channel")
"""Loaded in this order by the client's `setup_hook`."""
