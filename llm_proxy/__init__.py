"""The OpenAI-compatible LLM proxy: a call as a pipeline (wire format, the call with its
ports, the adapters behind them) served by a plain ASGI app."""
