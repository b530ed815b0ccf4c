"""Error types: every user-facing failure is a LowbitError whose message names the problem and the fix."""


class LowbitError(Exception):
    """Base class; the CLI prints its message on one line and exits with code 2."""


class ConfigError(LowbitError, ValueError):
    """A config file, override or argument is invalid."""


class DataError(LowbitError):
    """A dataset file is missing, corrupted or of the wrong format."""


class ChecksumError(DataError):
    """A downloaded or cached file does not match its expected SHA-256."""


class CheckpointError(LowbitError):
    """A checkpoint or exported model is missing, corrupted or from another architecture."""


class OutputError(LowbitError):
    """An output file or directory cannot be written (not a directory, read-only, disk full, ...)."""


class LimitError(ConfigError):
    """A request exceeds a resource bound (sample count, decompressed size, YAML expansion)."""


class RunDirLockedError(LowbitError):
    """Another live process is writing the same run directory."""


class TrainingDivergedError(LowbitError):
    """Training diverged (non-finite or out-of-bound loss/weight); the last good checkpoint is kept."""
