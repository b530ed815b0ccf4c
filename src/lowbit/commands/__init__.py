"""CLI command groups; each module defines ``register(subparsers)``."""


def add_config_args(parser) -> None:
    """The ``CONFIG [--set key=value ...]`` arguments every config-driven command shares."""
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted path), may repeat")
