"""Query client for notebooks: SQL and metrics as pyarrow Tables or pandas
DataFrames.

    from strata.sdk.query import QueryClient

    q = QueryClient("http://localhost:8000", token="qt_...")
    df = q.sql("SELECT toDate(ts) AS day, count() FROM events GROUP BY day")
    table = q.sql("SELECT ...", output="arrow")
    q.explain("SELECT ...")["served_from"]

``Client`` (strata.sdk.client) gains the same ``sql``/``explain``/``metric``
methods through ``QueryMixin`` when it is given a ``token``.

Results travel as Arrow IPC (``Accept: application/vnd.apache.arrow.stream``),
so column types survive. pyarrow is imported on the first call and pandas
only when a DataFrame is asked for. The routing and completeness facts of
the last answer are in ``last_meta`` (``served_from``, ``cache``,
``complete_until``, ``open_windows``, ``revised``).
"""

from __future__ import annotations

from typing import Any, Literal

import httpx

ARROW_STREAM = "application/vnd.apache.arrow.stream"
Output = Literal["pandas", "arrow"]


class QueryError(Exception):
    """The server refused or failed the query; ``status`` is the HTTP code
    and ``retry_after`` the seconds to wait on 429."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after


def _error(response: httpx.Response) -> QueryError:
    try:
        message = str(response.json().get("error", response.text))
    except ValueError:
        message = response.text
    retry = response.headers.get("retry-after")
    return QueryError(response.status_code, message, float(retry) if retry else None)


class QueryMixin:
    """``sql``/``explain``/``metric`` for any class with ``url`` and
    ``token`` attributes (the SDK's ``Client`` and ``AsyncClient``)."""

    url: str
    token: str | None
    last_meta: dict[str, Any]
    query_timeout: float = 120.0

    def _query_headers(self, accept: str = "application/json") -> dict[str, str]:
        if not getattr(self, "token", None):
            raise QueryError(401, "a query token is required (token=...)")
        return {"Authorization": f"Bearer {self.token}", "Accept": accept}

    def sql(self, query: str, *, output: Output = "pandas") -> Any:
        """Run ``query`` (read-only, sandboxed) and return a pandas DataFrame
        (default) or a pyarrow Table (``output="arrow"``)."""
        import pyarrow as pa

        response = httpx.post(
            f"{self.url}/v1/sql",
            json={"sql": query},
            headers=self._query_headers(ARROW_STREAM),
            timeout=self.query_timeout,
        )
        if response.status_code != 200:
            raise _error(response)
        self.last_meta = {
            key[len("x-strata-") :].replace("-", "_"): value
            for key, value in response.headers.items()
            if key.lower().startswith("x-strata-")
        }
        table = pa.ipc.open_stream(pa.py_buffer(response.content)).read_all()
        if output == "arrow":
            return table
        if output == "pandas":
            return table.to_pandas()
        raise ValueError(f"output: expected 'pandas' or 'arrow', got {output!r}")

    def explain(self, query: str) -> dict[str, Any]:
        """The router's decision for ``query`` without running it."""
        response = httpx.post(
            f"{self.url}/v1/sql",
            json={"sql": query, "explain": True},
            headers=self._query_headers(),
            timeout=self.query_timeout,
        )
        if response.status_code != 200:
            raise _error(response)
        body: dict[str, Any] = response.json()
        return body

    def metric(self, name: str, *, output: Output | None = None, **params: Any) -> Any:
        """``GET /v1/metrics/<name>`` (``dau``, ``revenue``, ``top``, ...);
        the JSON body, or its rows as a DataFrame/Table with ``output``.
        ``funnel`` takes the request body as keyword arguments."""
        if name == "funnel":
            response = httpx.post(
                f"{self.url}/v1/metrics/funnel",
                json=params,
                headers=self._query_headers(),
                timeout=self.query_timeout,
            )
        else:
            response = httpx.get(
                f"{self.url}/v1/metrics/{name}",
                params=params,
                headers=self._query_headers(),
                timeout=self.query_timeout,
            )
        if response.status_code != 200:
            raise _error(response)
        body: dict[str, Any] = response.json()
        self.last_meta = {k: v for k, v in body.items() if k != "rows"}
        if output is None:
            return body
        import pyarrow as pa

        table = pa.Table.from_pylist(body["rows"])
        return table if output == "arrow" else table.to_pandas()


class QueryClient(QueryMixin):
    """A query-only client: ``QueryClient(url, token)``."""

    def __init__(self, url: str, token: str, *, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.query_timeout = timeout
        self.last_meta = {}


def sql(url: str, token: str, query: str, *, output: Output = "pandas") -> Any:
    """One-shot helper: ``sql(url, token, "SELECT ...")``."""
    return QueryClient(url, token).sql(query, output=output)
