"""The text-generation-inference backend: `TgiExecutor` keeps the `backend.GenerationBackend` contract with a TGI
server doing the generation. `client` speaks TGI's HTTP, `render` builds request bodies, `info` reads `/info`,
`stream` reads an answer, `ranking` scores categories, `backend` queues and runs requests."""

from model_server.config import TgiConfig
from model_server.tgi.backend import ERROR_KINDS, TgiExecutor, TgiJob
from model_server.tgi.client import TgiClient
from model_server.tgi.info import TgiServerInfo

__all__ = ["ERROR_KINDS", "TgiClient", "TgiConfig", "TgiExecutor", "TgiJob", "TgiServerInfo"]
