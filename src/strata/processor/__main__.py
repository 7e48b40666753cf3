"""``python -m strata.processor`` = ``strata process``: run the processor
alone, writing live windows to the Redis serving store."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

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
    log_ = open_log(config)
    serving = open_serving(config)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="strata process")
    add_arguments(parser)
    sys.exit(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
