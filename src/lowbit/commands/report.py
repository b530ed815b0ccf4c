"""CLI commands of this group (filled in by the issue that owns it)."""


def register(sub) -> None:
    """Add this group's sub-parsers to the root parser."""
