"""CLI command groups; each module defines ``register(subparsers)``."""


def add_config_args(parser) -> None:
    """The ``CONFIG [--set key=value ...]`` arguments every config-driven command shares."""
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted path), may repeat")


def add_run_dir_args(parser) -> None:
    """``--out``, ``--resume``, ``--force``, ``--quiet``: the run-directory options of training commands."""
    parser.add_argument("--out", default=None, help="output directory (default: runs/<config file stem>)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    parser.add_argument("--force", action="store_true", help="start over even if --out already holds a run")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
