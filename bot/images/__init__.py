"""Images from users: checking bytes by content (`check`) and fetching links safely (`fetch`)."""
