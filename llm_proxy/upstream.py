"""The upstream port of a call (:class:`SdkUpstream`): the ``openai`` SDK's async client,
with its request template cached, and its errors mapped to what the client gets.

The proxy forwards bytes it already has (``content=``), to the same URL with the
same headers, call after call. The SDK rebuilds that request from scratch each
time (merge headers, parse and join the URL, normalise timeouts): about 0.1 ms
of CPU, a tenth of the proxy's whole per-call cost. :class:`UpstreamClient`
builds it once per (method, path, retry number) through the SDK itself and then
only swaps the body; everything else (retries with backoff, timeouts, error
mapping, auth) stays the SDK's. Requests with anything the template cannot
know (JSON to serialise, files, query parameters, per-call timeouts or
headers other than the ones cached) go through the SDK's own builder.
``tests/llm_proxy/unit/test_upstream_client.py`` checks that both builders give the same
request.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx2
import openai
from openai._models import FinalRequestOptions

from kernel.errors import ProxyError
from kernel.settings import ModelAlias, ProxySettings
from llm_proxy.metrics import ProxyMetrics
from llm_proxy.ports import UpstreamBroke
from llm_proxy.upstream_http import lean_http_client
from llm_proxy.wire import UPSTREAM_PATHS

TemplateKey = tuple[str, str, int, tuple[tuple[str, str], ...]]


class UpstreamClient(openai.AsyncOpenAI):
    """``openai.AsyncOpenAI`` whose requests with ready-made bytes reuse a cached template."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._templates: dict[TemplateKey, tuple[str, httpx2.URL, httpx2.Headers,
                                                 dict[str, Any]]] = {}  # fmt: skip

    def _should_retry(self, response: httpx2.Response) -> bool:
        """Never retry an answer (429, 5xx): the client gets it and its own SDK retries, so
        retries do not stack (3 x 3 upstream calls per call). Connection failures, where
        no answer came, are still retried (``proxy.upstream_max_retries``)."""
        return False

    @property
    def user_agent(self) -> str:
        return f"AsyncOpenAI/Python {self._version}"  # the SDK's own, not this class's name

    def _build_request(self, options: FinalRequestOptions, *,
                       retries_taken: int = 0) -> httpx2.Request:  # fmt: skip
        content = options.content
        key = _template_key(options, retries_taken)
        if key is None or not isinstance(content, bytes) or self._idempotency_header:
            return super()._build_request(options, retries_taken=retries_taken)
        template = self._templates.get(key)
        if template is None:
            built = super()._build_request(options, retries_taken=retries_taken)
            headers = httpx2.Headers([(name, value) for name, value in built.headers.raw
                                      if name.lower() != b"content-length"])  # fmt: skip
            template = (built.method, built.url, headers, built.extensions)
            self._templates[key] = template
        method, url, headers, extensions = template
        return httpx2.Request(method, url, headers=headers, content=content,
                              extensions=dict(extensions))  # fmt: skip


def _template_key(options: FinalRequestOptions, retries_taken: int) -> TemplateKey | None:
    """The cache key, or None when the request carries something a template cannot hold."""
    if not isinstance(options.content, bytes):
        return None
    if options.json_data is not None or options.extra_json is not None:
        return None
    if options.files is not None or options.params:
        return None
    if not isinstance(options.timeout, openai.NotGiven):
        return None
    if options.follow_redirects is not None:
        return None
    headers = options.headers
    if isinstance(headers, openai.NotGiven) or headers is None:
        items: tuple[tuple[str, str], ...] = ()
    else:
        if not all(isinstance(v, str) for v in headers.values()):
            return None  # Omit() and friends: let the SDK decide
        items = tuple(sorted((str(k), str(v)) for k, v in headers.items()))
    return options.method, options.url, retries_taken, items


def upstream_client(alias: ModelAlias, proxy: ProxySettings) -> UpstreamClient:
    """The client for one model alias: its base URL, its key (from the environment)."""
    key = os.environ.get(alias.upstream_api_key_env, "") if alias.upstream_api_key_env else ""
    http_client = (
        lean_http_client(max_connections=2000) if proxy.upstream_transport == "lean"
        else openai.DefaultAsyncHttpxClient(
            limits=httpx2.Limits(max_connections=2000, max_keepalive_connections=500))
    )  # fmt: skip
    return UpstreamClient(
        base_url=alias.upstream_base_url, api_key=key or "no-key",
        timeout=httpx2.Timeout(proxy.upstream_timeout_s, connect=proxy.upstream_connect_timeout_s),
        max_retries=proxy.upstream_max_retries, http_client=http_client,
    )  # fmt: skip


class SdkAnswer:
    """An upstream answer read through httpx (the SDK's transport); a broken whole read is
    :class:`~llm_proxy.ports.UpstreamBroke`, a broken chunk read httpx's own error."""

    __slots__ = ("_response",)

    def __init__(self, response: httpx2.Response) -> None:
        self._response = response

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    async def read(self) -> bytes:
        try:
            return await self._response.aread()
        except httpx2.HTTPError as exc:
            raise UpstreamBroke(str(exc)) from exc

    def chunks(self) -> AsyncIterator[bytes]:
        # httpx's own iterator, unwrapped (a stream has a chunk per token): a broken read
        # raises httpx2.HTTPError, which SdkUpstream.broken names.
        return self._response.aiter_bytes()

    async def close(self) -> None:
        await self._response.aclose()


class SdkUpstream:
    """The call's Upstream port: one SDK client per model alias, its errors as ProxyError."""

    broken: tuple[type[Exception], ...] = (httpx2.HTTPError,)

    def __init__(self, clients: dict[str, UpstreamClient], metrics: ProxyMetrics) -> None:
        self.clients = clients
        self.metrics = metrics

    async def post(self, alias: ModelAlias, route: str, body: bytes) -> SdkAnswer:
        model = alias.alias
        try:
            response: httpx2.Response = await self.clients[model].post(
                UPSTREAM_PATHS[route], cast_to=httpx2.Response, content=body, stream=True,
                options={"headers": {"Content-Type": "application/json"}},
            )  # fmt: skip
            return SdkAnswer(response)
        except openai.APIStatusError as exc:
            self.metrics.upstream_errors.labels(model, str(exc.status_code)).inc()
            raise status_error(exc) from exc
        except openai.APITimeoutError as exc:
            self.metrics.upstream_errors.labels(model, "timeout").inc()
            raise ProxyError(504, "upstream_timeout", "upstream did not answer in time",
                             kind="server_error") from exc  # fmt: skip
        except openai.APIConnectionError as exc:
            self.metrics.upstream_errors.labels(model, "connection").inc()
            raise ProxyError(502, "upstream_unreachable", "upstream could not be reached",
                             kind="server_error") from exc  # fmt: skip

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()


def status_error(exc: openai.APIStatusError) -> ProxyError:
    """Upstream's refusal as the client sees it: a 429 (the client's SDK backs off by
    Retry-After and retries) and the client's own mistakes (a bad parameter) pass through
    with what upstream said; anything else is a 502."""
    passed = {k: v for k in ("retry-after", "retry-after-ms", "x-request-id")
              if (v := exc.response.headers.get(k))}  # fmt: skip
    if exc.status_code == 429:
        return _passthrough(exc, "rate_limit_exceeded", passed)
    if 400 <= exc.status_code < 500 and exc.status_code not in (401, 403):
        return _passthrough(exc, "upstream_rejected", passed)
    return ProxyError(502, "upstream_error", f"upstream answered {exc.status_code}",
                      kind="server_error", headers=passed)  # fmt: skip


def _passthrough(exc: openai.APIStatusError, default_code: str,
                 headers: dict[str, str]) -> ProxyError:  # fmt: skip
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    error = error if isinstance(error, dict) else {}
    message, code, kind = error.get("message"), error.get("code"), error.get("type")
    return ProxyError(exc.status_code, str(code or default_code),
                      str(message or f"upstream refused the request ({exc.status_code})"),
                      param=error.get("param"), headers=headers,
                      kind=str(kind or "invalid_request_error"))  # fmt: skip
