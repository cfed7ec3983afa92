"""What every front end shares, with no Discord import: the conversation pipeline, rate limits, decoded pictures,
and the services (database, backend, image fetcher) a front end opens once and hands in."""
