"""Named model zoo: DCGAN generators/discriminators and CNN classifiers (see ``list_models``)."""

from lowbit.models import classifiers, dcgan, extractor, i2i  # noqa: F401
from lowbit.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
