"""The OpenAI-compatible backend: `OpenAIExecutor` keeps the `backend.GenerationBackend` contract with a server
that speaks chat completions (vLLM, SGLang, TGI's Messages API, llama.cpp, Ollama). `client` speaks the HTTP,
`render` turns a prompt into messages, `stream` reads an answer, `ranking` scores categories, `backend` runs
requests on the shared `remote.backend.RemoteExecutor`."""

from model_server.config import OpenAIConfig
from model_server.openai.backend import OpenAIExecutor, OpenAIServerInfo
from model_server.openai.client import OpenAIClient

__all__ = ["OpenAIClient", "OpenAIConfig", "OpenAIExecutor", "OpenAIServerInfo"]
