"""lowbit.export."""
