"""Synthetic traffic that looks like a real product's.

* Users follow a power law (a few heavy users, a long tail), each with a
  home country (about 50, weighted like real traffic), platform and OS.
* Sessions walk a funnel: page_view (1..n) -> signup -> add_to_cart ->
  purchase (log-normal revenue in the country's currency).
* A small share of events is out of order (a few seconds back, within the
  default 30 s bound) and a smaller share is late (minutes back, as from a
  phone that was offline).
* A share of batches is sent twice with the same event_ids, like an SDK
  retry after a lost response.

``TrafficModel`` makes events; ``run`` sends them to a strata server and
retries every unacknowledged batch with the same event_ids until it is
acknowledged.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

COUNTRIES: list[tuple[str, float, str]] = [
    ("US", 22.0, "USD"), ("IN", 9.0, "INR"), ("BR", 5.0, "BRL"), ("GB", 5.0, "GBP"),
    ("DE", 5.0, "EUR"), ("FR", 4.0, "EUR"), ("JP", 4.0, "JPY"), ("CA", 3.0, "CAD"),
    ("ID", 3.0, "IDR"), ("MX", 3.0, "MXN"), ("ES", 2.5, "EUR"), ("IT", 2.5, "EUR"),
    ("AU", 2.0, "AUD"), ("KR", 2.0, "KRW"), ("NL", 1.8, "EUR"), ("TR", 1.8, "TRY"),
    ("PL", 1.5, "PLN"), ("RU", 1.5, "RUB"), ("PH", 1.4, "PHP"), ("VN", 1.3, "VND"),
    ("AR", 1.2, "ARS"), ("CO", 1.1, "COP"), ("SE", 1.0, "SEK"), ("CH", 1.0, "CHF"),
    ("BE", 0.9, "EUR"), ("NG", 0.9, "NGN"), ("EG", 0.8, "EGP"), ("ZA", 0.8, "ZAR"),
    ("TH", 0.8, "THB"), ("MY", 0.7, "MYR"), ("SG", 0.7, "SGD"), ("AT", 0.6, "EUR"),
    ("PT", 0.6, "EUR"), ("CL", 0.6, "CLP"), ("PE", 0.5, "PEN"), ("IL", 0.5, "ILS"),
    ("DK", 0.5, "DKK"), ("NO", 0.5, "NOK"), ("FI", 0.4, "EUR"), ("IE", 0.4, "EUR"),
    ("NZ", 0.4, "NZD"), ("CZ", 0.4, "CZK"), ("RO", 0.4, "RON"), ("HU", 0.3, "HUF"),
    ("GR", 0.3, "EUR"), ("UA", 0.3, "UAH"), ("PK", 0.3, "PKR"), ("BD", 0.3, "BDT"),
    ("KE", 0.2, "KES"), ("MA", 0.2, "MAD"),
]
PLATFORMS = [("web", 0.55, ("macOS", "Windows", "Linux")), ("ios", 0.25, ("iOS",)), ("android", 0.20, ("Android",))]
PAGES = ["/", "/pricing", "/docs", "/blog", "/features", "/signup", "/product/1", "/product/2", "/cart"]
REFERRERS = ["", "google.com", "twitter.com", "news.ycombinator.com", "reddit.com", "github.com"]


@dataclass
class User:
    user_id: str
    country: str
    currency: str
    platform: str
    os: str


@dataclass
class TrafficModel:
    users: int = 20_000
    zipf_s: float = 1.15
    out_of_order_share: float = 0.03
    late_share: float = 0.003
    seed: int | None = None
    rng: random.Random = field(init=False)
    _cumulative: list[float] = field(init=False)
    _pending: list[dict[str, Any]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        weights = [1.0 / (rank ** self.zipf_s) for rank in range(1, self.users + 1)]
        total = sum(weights)
        acc = 0.0
        self._cumulative = []
        for w in weights:
            acc += w / total
            self._cumulative.append(acc)
        self._country_weights = [w for _, w, _ in COUNTRIES]
        self._platform_weights = [w for _, w, _ in PLATFORMS]

    def user(self, rank: int) -> User:
        r = random.Random(rank)  # a user's attributes never change
        code, _, currency = r.choices(COUNTRIES, self._country_weights)[0]
        platform, _, oses = r.choices(PLATFORMS, self._platform_weights)[0]
        return User(f"u{rank}", code, currency, platform, r.choice(oses))

    def _pick_rank(self) -> int:
        import bisect

        return bisect.bisect_left(self._cumulative, self.rng.random()) + 1

    def session(self, now_ms: int) -> list[dict[str, Any]]:
        user = self.user(self._pick_rank())
        rng = self.rng
        session_id = os.urandom(8).hex()
        t = now_ms - rng.randint(0, 2000)
        base = {
            "user_id": user.user_id,
            "session_id": session_id,
            "country": user.country,
            "platform": user.platform,
            "os": user.os,
            "app_version": rng.choice(["3.1.0", "3.2.0", "3.2.1"]),
        }
        events: list[dict[str, Any]] = []

        def add(event_type: str, **extra: Any) -> None:
            nonlocal t
            t += rng.randint(50, 1500)
            events.append({"event_id": os.urandom(16).hex(), "event_type": event_type, "ts": t, **base, **extra})

        for _ in range(1 + int(rng.expovariate(0.5))):
            add("page_view", path=rng.choice(PAGES), referrer=rng.choice(REFERRERS))
        if rng.random() < 0.3:
            add("signup", properties={"plan": rng.choice(["free", "pro", "team"])})
            if rng.random() < 0.5:
                add("add_to_cart", properties={"sku": f"sku-{rng.randint(1, 40)}"})
                if rng.random() < 0.5:
                    revenue = round(rng.lognormvariate(3.3, 0.8), 2)
                    add("purchase", revenue=revenue, currency=user.currency,
                        properties={"items": rng.randint(1, 4)})
        for event in events:
            roll = rng.random()
            if roll < self.late_share:
                event["ts"] -= rng.randint(120_000, 900_000)
            elif roll < self.late_share + self.out_of_order_share:
                event["ts"] -= rng.randint(1_000, 20_000)
            event["timestamp"] = event.pop("ts")
        return events

    def events(self, now_ms: int) -> Iterator[dict[str, Any]]:
        while True:
            if not self._pending:
                self._pending = self.session(now_ms)
            yield self._pending.pop(0)

    def batch(self, size: int, now_ms: int | None = None) -> list[dict[str, Any]]:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        out: list[dict[str, Any]] = []
        while len(out) < size:
            if not self._pending:
                self._pending = self.session(now)
            out.append(self._pending.pop(0))
        return out


def iso_now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class GeneratorStats:
    sent_events: int = 0
    accepted: int = 0
    rejected: int = 0
    retried_batches: int = 0
    duplicate_batches: int = 0
    errors: int = 0
    acknowledged_ids: set[str] = field(default_factory=set)


async def _send(client: Any, url: str, key: str, events: list[dict[str, Any]], stats: GeneratorStats,
                compress: bool, keep_ids: bool) -> None:
    body = json.dumps({"batch": events, "sent_at": iso_now()}).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if compress:
        body = gzip.compress(body, 1)
        headers["Content-Encoding"] = "gzip"
    delay = 0.05
    while True:
        try:
            response = await client.post(f"{url}/v1/batch", content=body, headers=headers)
            if response.status_code == 200:
                result = response.json()
                stats.accepted += result["accepted"]
                stats.rejected += len(result["rejected"])
                if keep_ids:
                    rejected = {r["index"] for r in result["rejected"]}
                    stats.acknowledged_ids.update(
                        e["event_id"] for i, e in enumerate(events) if i not in rejected
                    )
                return
            if response.status_code < 500 and response.status_code != 429:
                stats.errors += 1
                return
        except Exception:
            pass
        stats.retried_batches += 1
        await asyncio.sleep(delay)
        delay = min(2.0, delay * 2)


async def run_async(url: str, key: str, *, rate: float, duration: float, batch_size: int = 100,
                    duplicate_share: float = 0.01, concurrency: int = 8, seed: int | None = None,
                    compress: bool = False, progress: bool = True, keep_ids: bool = False,
                    total_events: int | None = None) -> GeneratorStats:
    import httpx

    model = TrafficModel(seed=seed)
    stats = GeneratorStats()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_events or (int(rate * duration) if duration else None), unit="ev", unit_scale=True)
    semaphore = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:

        async def one(events: list[dict[str, Any]]) -> None:
            try:
                await _send(client, url, key, events, stats, compress, keep_ids)
                if model.rng.random() < duplicate_share:
                    stats.duplicate_batches += 1
                    await _send(client, url, key, events, stats, compress, False)
            finally:
                semaphore.release()
                if bar is not None:
                    bar.update(len(events))

        while True:
            elapsed = time.monotonic() - started
            if duration and elapsed >= duration:
                break
            if total_events is not None and stats.sent_events >= total_events:
                break
            target = rate * elapsed
            if stats.sent_events >= target + batch_size:
                await asyncio.sleep(min(0.05, (stats.sent_events - target) / max(rate, 1)))
                continue
            size = batch_size if total_events is None else min(batch_size, total_events - stats.sent_events)
            events = model.batch(size)
            stats.sent_events += len(events)
            await semaphore.acquire()
            task = asyncio.create_task(one(events))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    if bar is not None:
        bar.close()
    return stats


def run(url: str, key: str, **kwargs: Any) -> GeneratorStats:
    return asyncio.run(run_async(url, key, **kwargs))
