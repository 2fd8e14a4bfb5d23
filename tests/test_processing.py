"""OneRProcessor: every image kind and mode, the tokenizer, transformers' call convention and kwargs, bad input."""

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from processing_oner import to_rgb_image
from processing_oner.tokenizer import VOCAB_FILE, build_tokenizer


def _rgb_at(image: Image.Image, xy=(0, 0)) -> tuple:
    return to_rgb_image(image).getpixel(xy)


def test_transparent_modes_are_composited_on_white():
    transparent_red = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert _rgb_at(transparent_red) == (255, 255, 255)
    half_red = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    assert _rgb_at(half_red)[0] == 255 and 120 < _rgb_at(half_red)[1] < 135
    transparent_black = Image.new("LA", (4, 4), (0, 0))
    assert _rgb_at(transparent_black) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    palette.info["transparency"] = 0
    assert _rgb_at(palette) == (255, 255, 255)


def test_other_pil_modes_become_rgb():
    assert _rgb_at(Image.new("L", (3, 3), 10)) == (10, 10, 10)
    assert _rgb_at(Image.new("1", (3, 3), 1)) == (255, 255, 255)
    assert _rgb_at(Image.new("CMYK", (3, 3), (0, 0, 0, 0))) == (255, 255, 255)
    wide = Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16))
    assert wide.mode == "I;16" and _rgb_at(wide) == (255, 255, 255)
    mid = Image.fromarray(np.full((3, 3), 32896, dtype=np.uint16))
    assert _rgb_at(mid) == (128, 128, 128)
    palette = Image.new("P", (3, 3), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    assert _rgb_at(palette) == (0, 255, 0)
    assert _rgb_at(Image.new("YCbCr", (3, 3), (255, 128, 128)))[0] > 250


def test_arrays_and_tensors_in_any_layout():
    hwc = np.zeros((5, 7, 3), dtype=np.uint8)
    hwc[..., 0] = 255
    assert to_rgb_image(hwc).size == (7, 5) and _rgb_at(to_rgb_image(hwc)) == (255, 0, 0)
    chw = torch.zeros(3, 5, 7)
    chw[1] = 1.0
    assert to_rgb_image(chw).size == (7, 5) and _rgb_at(to_rgb_image(chw)) == (0, 255, 0)
    assert _rgb_at(to_rgb_image(np.full((4, 4), 0.5))) == (128, 128, 128)
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)  # fully transparent black
    assert _rgb_at(to_rgb_image(rgba)) == (255, 255, 255)
    assert _rgb_at(to_rgb_image(np.full((2, 2), 65535, dtype=np.uint16))) == (255, 255, 255)


@pytest.mark.parametrize(
    "image,error,message",
    [
        (np.zeros((8, 8, 5), dtype=np.uint8), ValueError, "1, 3 or 4 channels"),
        (np.zeros((5, 8, 8), dtype=np.uint8), ValueError, "1, 3 or 4 channels"),
        (np.zeros((2, 3, 4, 4, 4), dtype=np.uint8), ValueError, "must be"),
        (np.full((4, 4, 3), np.nan), ValueError, "NaN"),
        ("cat.png", TypeError, "PIL images, numpy arrays or torch tensors"),
        (Image.new("RGB", (0, 3)), ValueError, "zero size"),
    ],
)
def test_bad_images_get_clear_errors(tiny_processor, image, error, message):
    with pytest.raises(error, match=message):
        tiny_processor(images=[image])


def test_images_of_any_size_become_model_sized_pixels(tiny_processor, tiny_config):
    images = [Image.new("RGB", (300, 20), "red"), Image.new("RGBA", (5, 9)), np.zeros((64, 64, 3), np.uint8)]
    pixel_values = tiny_processor(images=images)["pixel_values"]
    assert pixel_values.shape == (3, 3, tiny_config.image_size, tiny_config.image_size)
    assert pixel_values.dtype == torch.float32
    # a batched 4-D tensor or a single image work too
    assert tiny_processor(images=torch.rand(2, 3, 20, 20))["pixel_values"].shape[0] == 2
    assert tiny_processor(images=Image.new("L", (8, 8)))["pixel_values"].shape[0] == 1


def test_png_round_trip_of_every_mode(tiny_processor):
    for mode in ("RGB", "RGBA", "LA", "L", "P", "I;16", "CMYK", "1"):
        buffer = io.BytesIO()
        Image.new("RGB", (10, 10), "blue").convert(mode).save(buffer, format="TIFF" if mode == "CMYK" else "PNG")
        buffer.seek(0)
        assert tiny_processor(images=Image.open(buffer))["pixel_values"].shape[0] == 1, mode


def test_tokenizer_is_bert_uncased_wordpiece_without_special_tokens(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    assert len(VOCAB_FILE.read_text().splitlines()) == 30522 == len(tokenizer)
    assert tokenizer.tokenize("A Red APPLE!") == ["a", "red", "apple", "!"]
    encoded = tiny_processor(text=["red apple", "grinning face with big eyes"])
    assert set(encoded) == {"input_ids", "attention_mask"}
    assert tokenizer.cls_token_id not in encoded["input_ids"].tolist()[0]
    assert encoded["attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1] * 5]
    assert tokenizer.convert_tokens_to_ids("[MASK]") == 103 and tokenizer.pad_token_id == 0


def test_over_long_text_is_truncated_with_a_warning(tiny_processor, tiny_config):
    long_text = " ".join(["apple"] * 100)
    with pytest.warns(UserWarning, match="truncated"):
        encoded = tiny_processor(text=[long_text, "pear"])
    assert encoded["input_ids"].shape == (2, tiny_config.max_position_embeddings)


def test_outputs_are_exactly_the_model_inputs_and_feed_it(tiny_processor, tiny_model):
    images = [Image.new("RGB", (20, 20), c) for c in ("red", "green")]
    texts = ["red apple", "a green leaf on a tree"]
    # no description of the token stream: the model builds [CLS] + patches + words itself
    assert set(tiny_processor(images=images)) == {"pixel_values"}
    joint = tiny_processor(images=images, text=texts)
    assert set(joint) == {"pixel_values", "input_ids", "attention_mask"}
    assert tiny_model(**joint).logits_per_image.shape == (2, 2)
    tiny_model.get_multimodal_features(**joint)
    # n images vs m labels, as for zero-shot scoring
    scoring = tiny_processor(images=images, text=["a", "b", "c"])
    assert tiny_model(**scoring).logits_per_image.shape == (2, 3)


def test_images_come_first_as_in_transformers(tiny_processor):
    image = Image.new("RGB", (20, 20), "red")
    positional = tiny_processor([image], ["red apple"])
    by_keyword = tiny_processor(text=["red apple"], images=[image])
    assert set(positional) == set(by_keyword) == {"pixel_values", "input_ids", "attention_mask"}
    for key in by_keyword:
        torch.testing.assert_close(positional[key], by_keyword[key])
    with pytest.raises(TypeError, match="takes images first"):
        tiny_processor(["red apple"], [image])  # the old text-first order
    with pytest.raises(TypeError, match="texts go in text=..., since OneRProcessor takes images first"):
        tiny_processor("red apple")


def test_image_processor_kwargs_reach_the_image_processor(tiny_processor, tiny_config):
    wide = Image.new("RGB", (40, 20), "red")
    size = tiny_config.image_size
    assert tiny_processor(images=wide)["pixel_values"].shape == (1, 3, size, size)
    uncropped = tiny_processor(images=wide, do_center_crop=False)["pixel_values"]
    assert uncropped.shape == (1, 3, size, 2 * size)
    by_modality = tiny_processor(images=wide, images_kwargs={"do_center_crop": False})["pixel_values"]
    torch.testing.assert_close(by_modality, uncropped)


def test_tokenizer_kwargs_reach_the_tokenizer(tiny_processor, tiny_config):
    padded = tiny_processor(text=["red apple"], padding="max_length")
    assert padded["input_ids"].shape == (1, tiny_config.max_position_embeddings)
    for kwargs in (dict(max_length=2), dict(text_kwargs={"max_length": 2})):
        with pytest.warns(UserWarning, match="truncated"):
            assert tiny_processor(text=["red apple pie"], **kwargs)["input_ids"].shape == (1, 2)
    # defaults that follow the model: no [CLS]/[SEP] of the tokenizer's own
    assert tiny_processor(text="red")["input_ids"].tolist() == [[tiny_processor.tokenizer.convert_tokens_to_ids("red")]]


@pytest.fixture
def transformers_log():
    """What transformers logs (its loggers do not propagate to pytest's caplog)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield stream
    logger.removeHandler(handler)


def test_unknown_kwargs_are_named_in_a_warning(tiny_processor, transformers_log):
    encoded = tiny_processor(text=["red apple"], images=Image.new("RGB", (8, 8)), do_centre_crop_typo=False)
    assert "`do_centre_crop_typo` is not a valid argument" in transformers_log.getvalue()
    assert set(encoded) == {"pixel_values", "input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="images and text only, got videos="):
        tiny_processor(text="a", videos=[np.zeros((2, 8, 8, 3), np.uint8)])


def test_numpy_and_torch_outputs(tiny_processor):
    image, texts = Image.new("RGB", (30, 20), "blue"), ["red apple", "dog"]
    as_numpy = tiny_processor(images=[image], text=texts, return_tensors="np")
    as_torch = tiny_processor(images=[image], text=texts, return_tensors="pt")
    for key in ("pixel_values", "input_ids", "attention_mask"):
        assert isinstance(as_numpy[key], np.ndarray), key
        assert isinstance(as_torch[key], torch.Tensor), key
        np.testing.assert_allclose(as_numpy[key], as_torch[key].numpy())
    assert as_numpy["pixel_values"].dtype == np.float32


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(), ValueError, "text, images or both"),
        (dict(text=[]), ValueError, "text is an empty list"),
        (dict(images=[]), ValueError, "images is an empty list"),
        (dict(text=["ok", 3]), TypeError, "text 1 is a int"),
        (dict(text=7), TypeError, "string or a list of strings"),
        (dict(text=["fine", "   "]), ValueError, r"positions \[1\] are empty"),
        (dict(text="x", return_tensors="tf"), ValueError, "got return_tensors='tf'"),
    ],
)
def test_bad_text_gets_clear_errors(tiny_processor, kwargs, error, message):
    with pytest.raises(error, match=message):
        tiny_processor(**kwargs)


def test_processor_round_trips_through_save_pretrained(tmp_path, tiny_processor):
    from processing_oner import OneRProcessor

    tiny_processor.save_pretrained(tmp_path)
    loaded = OneRProcessor.from_pretrained(tmp_path)
    assert loaded.patch_size == tiny_processor.patch_size and loaded.image_size == tiny_processor.image_size
    image = Image.new("RGB", (33, 21), "orange")
    a, b = tiny_processor(text=["red apple"], images=[image]), loaded(text=["red apple"], images=[image])
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_missing_vocabulary_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocabulary not found"):
        build_tokenizer(16, tmp_path / "nope.txt")


def test_fast_paths_equal_the_general_pipeline(tiny_processor):
    """A plain call on images already at the model's size and default text options skips the image
    processor's resize/crop and transformers' per-text conversion; the outputs must not change."""
    import numpy as np
    import torch
    from PIL import Image

    size = tiny_processor.image_size
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(5)]
    texts = ["a red apple", "man in tuxedo: medium skin tone", "[MASK] face", "snowman", "ümlaut café"]
    fast = tiny_processor(images=images, text=texts)
    general = tiny_processor(images=images, text=texts, images_kwargs={"do_resize": True},
                             text_kwargs={"padding": "longest"})
    torch.testing.assert_close(fast["pixel_values"], general["pixel_values"], atol=1e-5, rtol=0)
    assert torch.equal(fast["input_ids"], general["input_ids"])
    assert torch.equal(fast["attention_mask"], general["attention_mask"])
    # and the tokenizer's own settings are left usable for a direct call afterwards
    direct = tiny_processor.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    assert torch.equal(direct["input_ids"], general["input_ids"])


def _structure(value):
    """Container types down to the leaves: what a caller indexing the output relies on."""
    if isinstance(value, list):
        return ["list", _structure(value[0])]
    if isinstance(value, np.ndarray):
        return ("ndarray", str(value.dtype), value.ndim)
    return type(value).__name__


def _tiny_clip_processor(tmp_path):
    """A CLIPProcessor from a four-token BPE vocabulary and an 8 px image processor (nothing downloaded)."""
    import json

    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizerFast

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "c</w>": 3}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizerFast(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


@pytest.mark.parametrize("call", ["texts", "text", "images", "image_and_text"])
def test_return_tensors_none_gives_lists_as_clip_processor_does(tiny_processor, tmp_path, call):
    clip = _tiny_clip_processor(tmp_path)
    image = Image.new("RGB", (10, 12), (200, 30, 40))
    kwargs = {"texts": dict(text=["a c", "c a a"]), "text": dict(text="a c"), "images": dict(images=[image, image]),
              "image_and_text": dict(images=image, text="a c")}[call]
    ours, theirs = tiny_processor(**kwargs, return_tensors=None), clip(**kwargs, return_tensors=None, padding=True)
    assert set(ours) == set(theirs)
    assert {k: _structure(v) for k, v in ours.items()} == {k: _structure(v) for k, v in theirs.items()}
    # The same numbers as the tensors, in lists.
    tensors = tiny_processor(**kwargs)
    for key, value in ours.items():
        expected = tensors[key][0] if key != "pixel_values" and isinstance(kwargs.get("text"), str) else tensors[key]
        np.testing.assert_allclose(np.asarray(value), expected.numpy(), atol=1e-6)
