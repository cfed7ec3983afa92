"""What the backends that talk to a model server over HTTP share: `http` (server-sent events, retries, the stall
timeout, error messages), `backend` (`RemoteExecutor`: the queue, deadlines and figures of the backend contract)
and `images` (images re-encoded and shrunk until a request body fits the server's limit)."""
