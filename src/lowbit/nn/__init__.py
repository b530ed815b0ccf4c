"""lowbit.nn."""
