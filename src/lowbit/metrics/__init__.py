"""lowbit.metrics."""
