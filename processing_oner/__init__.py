"""OneR processor, registered so that `save_pretrained` ships it as remote code."""

from transformers import AutoProcessor

from modeling_oner import OneRConfig

from .processing_oner import OneRProcessor, to_rgb_image
from .tokenizer import build_image_processor, build_processor, build_tokenizer

OneRProcessor.register_for_auto_class("AutoProcessor")
AutoProcessor.register(OneRConfig, OneRProcessor, exist_ok=True)

__all__ = ["OneRProcessor", "build_image_processor", "build_processor", "build_tokenizer", "to_rgb_image"]
