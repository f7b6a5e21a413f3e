from maect.models.vit import MaskedAutoencoderViT, build_model, pool  # noqa: F401
