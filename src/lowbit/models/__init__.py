"""Named model zoo (see ``list_models``): DCGAN, image-to-image (U-Net, ResNet, PatchGAN) and CNN classifiers;
``hub`` finds every shipped asset (pretrained GANs, FID extractors) with its card."""

from lowbit.models import classifiers, dcgan, extractor, hub, i2i  # noqa: F401
from lowbit.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
