"""One retention policy with a frozen clock: exactly the expected partitions
go (or move) in every layer, and the metrics of old ranges are unchanged."""

from __future__ import annotations

from pathlib import Path

from fixtures_lake import DAY_MS, LakeEnv, day_start_ms, make_events, today_minus
from strata.events import now_ms
from strata.lake import retention


def test_shortened_policy_with_a_frozen_clock(tmp_path: Path) -> None:
    env = LakeEnv(
        tmp_path,
        **{
            "store.raw_ttl": "4d",
            "store.rollup_5m_ttl": "2d",
            "lake.hot_retention": "3d",
            "log.retention": "1h",
            "log.segment_bytes": 20_000,
        },
    )
    try:
        old, middle, recent = today_minus(6), today_minus(3), today_minus(1)
        for index, day in enumerate((old, middle, recent)):
            env.produce(make_events(600, start_ms=day_start_ms(day), seed=80 + index))
        env.load()
        env.archive()
        daily_before = {m.name: env.rollup(m.name, "1d") for m in env.store.metrics}
        five_minute_before = {m.name: env.rollup(m.name, "5m") for m in env.store.metrics}
        log_records = sum(env.log.end_offsets("events").values())

        # Frozen clock: today 08:00 UTC, plus two hours so the log's records
        # (appended just now) are past its 1 h retention.
        now = max(day_start_ms(today_minus(0)) + 8 * 3_600_000, now_ms() + 2 * 3_600_000)
        report = retention.apply(env.config, store=env.store, lake=env.lake, log_=env.log, now=now)

        def partitions(table: str) -> set[str]:
            _, rows = env.store.query_rows(
                "SELECT DISTINCT partition_id FROM system.parts "
                "WHERE database = currentDatabase() AND table = {t:String} AND active",
                {"t": table},
            )
            return {r[0] for r in rows}

        ids = {d: d.replace("-", "") for d in (old, middle, recent)}
        # Raw: 4 d -> only the oldest day ended before now - 4 d.
        assert report.raw_dropped_days == [ids[old]]
        assert partitions("events") == {ids[middle], ids[recent]}
        # 5-minute rollups: 2 d -> old and middle go; daily rollups stay, unchanged.
        for metric in env.store.metrics:
            assert partitions(metric.rollup_table("5m")) == {ids[recent]}
            assert env.rollup(metric.name, "1d") == daily_before[metric.name]
            recent_rows = [
                r for r in five_minute_before[metric.name] if r[0].date().isoformat() == recent
            ]
            assert env.rollup(metric.name, "5m") == recent_rows
        # Lake: 3 d hot -> the oldest day moved to the cold tier, nothing lost.
        assert report.lake_moved_days == [old]
        hot = {f.day.isoformat() for f in env.lake.files(tiers=("hot",))}
        cold = {f.day.isoformat() for f in env.lake.files(tiers=("cold",))}
        assert (hot, cold) == ({middle, recent}, {old})
        assert env.lake.read(env.lake.files()).num_rows == 1800
        # Log: every closed segment went (all consumers had committed them).
        beginning = env.log.beginning_offsets("events")
        assert report.log_deleted_records == sum(beginning.values()) > 0
        assert sum(beginning.values()) < log_records

        # A batch over the old day still works from the cold tier and agrees.
        rows = env.job.recompute_day(old, now=now)
        assert all(r.difference == 0 for r in rows)
        for metric in env.store.metrics:
            assert env.rollup(metric.name, "1d") == daily_before[metric.name]
            assert partitions(metric.rollup_table("5m")) == {ids[recent]}

        # Applying it again at the same clock changes nothing more.
        again = retention.apply(env.config, store=env.store, lake=env.lake, log_=env.log, now=now)
        assert (again.raw_dropped_days, again.lake_moved_files) == ([], 0)
        assert DAY_MS  # (imported for readers of the day arithmetic above)
    finally:
        env.close()
