"""lowbit.train."""
