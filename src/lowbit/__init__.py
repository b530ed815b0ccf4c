"""lowbit: compress GANs and CNN classifiers to 1-8 bit weights and activations.

Public entry points: ``lowbit.quant`` (quantizer functions), ``lowbit.nn`` (quantized layers),
``lowbit.QuantSpec`` / ``lowbit.convert`` / ``lowbit.freeze`` (model conversion), ``lowbit.data``,
``lowbit.metrics``, ``lowbit.export``.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("QuantSpec", "PruneSpec", "compress", "convert", "freeze"):
        from lowbit import nn

        return getattr(nn, name)
    raise AttributeError(f"module 'lowbit' has no attribute '{name}'")
