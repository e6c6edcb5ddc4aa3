"""``dcs-server`` / ``python -m server``: parse the configuration at the edge and serve."""
from __future__ import annotations

import asyncio
import logging
import sys

from server.config import ConfigError, build_parser, load_config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # `dcs-server serve --repo ...` reads the same as `dcs-server --repo ...`
        argv = argv[1:]
    try:
        config = load_config(argv)
    except ConfigError as exc:
        build_parser().print_usage(sys.stderr)
        print(f"dcs-server: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.app import serve

    try:
        return asyncio.run(serve(config))
    except OSError as exc:
        logging.getLogger("server").error("cannot start: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
