"""Builds OneR's tokenizer and processor offline, from the vocabulary that ships with this package.

Not shipped as remote code: a saved model folder carries the built `tokenizer.json` instead.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

from .processing_oner import OneRProcessor

VOCAB_FILE = Path(__file__).with_name("vocab.txt")
SPECIAL_TOKENS = dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
# OpenAI CLIP's pixel statistics, the usual choice for image-text models trained from scratch.
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tokenizer(max_length: int, vocab_file: str | Path = VOCAB_FILE) -> PreTrainedTokenizerFast:
    """BERT uncased WordPiece that adds no special tokens (OneR prepends its own shared [CLS])."""
    vocab_file = Path(vocab_file)
    if not vocab_file.is_file():
        raise FileNotFoundError(f"WordPiece vocabulary not found: {vocab_file}")
    vocab = {token: index for index, token in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=max_length,
        model_input_names=["input_ids", "attention_mask"],
        padding_side="right",
        truncation_side="right",
        **SPECIAL_TOKENS,
    )


def build_image_processor(image_size: int) -> CLIPImageProcessor:
    """Resize the short side to `image_size`, centre-crop a square, normalise; PIL + numpy only."""
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True,
        do_center_crop=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        resample=3,  # bicubic
    )


def build_processor(config) -> OneRProcessor:
    """A processor matching an `OneRConfig` (image size, patch size, text length)."""
    return OneRProcessor(
        image_processor=build_image_processor(config.image_size),
        tokenizer=build_tokenizer(config.max_position_embeddings),
        patch_size=config.patch_size,
    )
