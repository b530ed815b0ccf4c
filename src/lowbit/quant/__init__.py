"""lowbit.quant."""
