"""``dcs-server`` / ``python -m dcs.server``: parse the configuration at the edge and serve."""
from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable

from dcs.server.config import ConfigError, build_parser, load_config

log = logging.getLogger("dcs.server")


def loop_factory(choice: str) -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The event loop ``--event-loop`` asks for, as (name, factory). ``auto`` takes uvloop when
    it is installed (the ``server`` extra installs it on Linux and macOS), else asyncio's; the
    default is asyncio's, the loop grpc.aio is tested on."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("--event-loop=uvloop: uvloop is not installed "
                                  "(pip install uvloop, or use --event-loop asyncio)") from None
        else:
            return "uvloop", uvloop.new_event_loop
    return "asyncio", asyncio.new_event_loop


def run(coro, factory: Callable[[], asyncio.AbstractEventLoop]):
    """``asyncio.run`` on a loop from ``factory`` (``asyncio.Runner`` needs Python 3.11)."""
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)
    loop = factory()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # `dcs-server serve --repo ...` reads the same as `dcs-server --repo ...`
        argv = argv[1:]
    try:
        config = load_config(argv)
        loop_name, factory = loop_factory(config.event_loop)
    except ConfigError as exc:
        build_parser().print_usage(sys.stderr)
        print(f"dcs-server: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dcs.server.app import serve

    log.info("event loop: %s", loop_name)
    try:
        return run(serve(config), factory)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
