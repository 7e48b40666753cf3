"""``python -m strata.processor`` = ``strata process``: run the processor
alone, writing live windows to the Redis serving store.

Two ways to split the partitions of ``events`` between processes:

* ``--partitions 0,1``: a static shard (any log backend);
* ``--group`` (the default when ``log.backend = "kafka"`` and no partitions
  are given): join the ``processor`` consumer group; rebalances move
  partitions with their state (``strata.processor.group``, decision 044).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

from strata.config import ConfigError, load_config

log = logging.getLogger("strata.processor")


def parse_partitions(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise ConfigError(f"--partitions: expected comma-separated numbers, got {text!r}") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--data-dir", help="data directory (default ./strata-data)")
    parser.add_argument(
        "--partitions", help="comma-separated partitions of topic 'events' (default: all)"
    )
    parser.add_argument(
        "--group",
        action="store_true",
        help="share the partitions with the other processors of the consumer group (Kafka); "
        "the default on Kafka when no partitions are given",
    )


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT; 0 on a clean stop, 2 on a config error."""
    from strata.log import open_log
    from strata.logs import setup_logging
    from strata.processor.runner import Processor
    from strata.serving import open_serving

    overrides = {"data_dir": args.data_dir} if args.data_dir else {}
    try:
        config = load_config(args.config, overrides=overrides)
        partitions = parse_partitions(args.partitions)
        if config.serving.backend != "redis":
            raise ConfigError(
                "serving.backend: `strata process` runs outside the core process and needs "
                "serving.backend = 'redis' (the in-process store would be invisible)"
            )
    except ConfigError as exc:
        print(f"strata: {exc}", file=sys.stderr)
        return 2
    setup_logging("processor")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    group = args.group or (
        config.log.backend == "kafka" and not partitions and not config.processor.partitions
    )
    if group and partitions:
        print("strata: --group and --partitions exclude each other", file=sys.stderr)
        return 2
    if group and config.log.backend != "kafka":
        print(
            f"strata: --group: log.backend = {config.log.backend!r} has no consumer groups; "
            "use log.backend = 'kafka' or static --partitions",
            file=sys.stderr,
        )
        return 2
    log_ = open_log(config)
    serving = open_serving(config)
    if group:
        return _run_group(config, log_, serving, stop)
    try:
        processor = Processor(config, log_, serving, partitions=partitions)
    except ConfigError as exc:
        print(f"strata: {exc}", file=sys.stderr)
        return 2
    log.info("processor %s: partitions %s", processor.shard, processor.partitions)
    try:
        processor.run(stop)
    finally:
        processor.close()
        serving.close()
        log_.close()
    return 0


def _run_group(config: Any, log_: Any, serving: Any, stop: threading.Event) -> int:
    from strata.processor.group import GroupProcessor

    def announce(partitions: list[int]) -> None:
        # One stdout line per assignment change: operators (and the tests) see the moves.
        print(f"strata process: owns partitions {partitions}", flush=True)

    member = GroupProcessor(config, log_, serving, on_change=announce)
    print(f"strata process: joined consumer group {member.GROUP!r}", flush=True)
    try:
        member.run(stop)
    finally:
        member.close()
        serving.close()
        log_.close()
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="strata process")
    add_arguments(parser)
    sys.exit(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
