"""lowbit.studies."""
