"""Serving: continuous batching of requests with per-request adapters (Engine), and an
OpenAI-compatible HTTP server over it (`hf-multilora serve`, server.py)."""

from .engine import Engine, EngineOverloaded
from .requests import RequestError, RequestStream, SamplingParams, StreamEvent, TokenLogprob

__all__ = ["Engine", "EngineOverloaded", "RequestError", "RequestStream", "SamplingParams", "StreamEvent", "TokenLogprob"]
