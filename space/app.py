"""OneR's one representation, shown: the Gradio app (a thin layer over `oner_demo`).

Run locally:   python space/app.py [--model DIR_OR_HUB_ID] [--revision COMMIT] [--port N]
Reload mode:   gradio space/app.py        (the model from ONER_MODEL, as below)
On a Space:    the Space runs `python app.py`; the model comes from ONER_MODEL (else the card's
               `models:`) at the commit ONER_MODEL_REVISION, both set by `oner-push --space`.

`demo` is this module's Gradio Blocks, as `gradio app.py` expects. Importing the module loads no
model: `app.demo` is built on first access (model from ONER_MODEL / ONER_MODEL_REVISION), and
`main()` builds it from the command line.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oner_demo  # noqa: E402

EX = oner_demo.EXAMPLES_DIR
CONCURRENCY_LIMIT = 2  # requests run at once; the rest wait in Gradio's queue
QUEUE_SIZE = 64  # beyond this many waiting requests, new ones are turned away at once
MAX_FILE_SIZE = "20mb"

INTRO = """\
# OneR: one transformer, one representation
Images, texts and image+text pairs all go through the **same** transformer and projection head
([Jang et al., AAAI 2023](https://arxiv.org/abs/2211.11153)), so every image patch, caption and
composed query lives in one embedding space. Each tab below uses that space a different way.
Model: `{model}`.
"""


def user_errors(fn):
    """Turn the demo's InputError into gr.Error, so the user sees the message and the app keeps serving."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except oner_demo.InputError as error:
            # A user's mistake, not the server's: no traceback in the log.
            raise gr.Error(str(error), print_exception=False) from error

    return wrapper


def image_input(label: str, elem_id: str | None = None) -> gr.Image:
    """An image upload whose decoding errors (not an image, a decompression bomb) read clearly.

    Gradio opens the upload with PIL before our function runs; its own exceptions would reach the
    user as a bare "Error", so the component's preprocess is wrapped to raise gr.Error instead.
    """
    component = gr.Image(
        label=label, type="filepath", image_mode=None, sources=["upload", "clipboard"], height=260, elem_id=elem_id
    )
    original = component.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except gr.Error:
            raise
        except Exception as error:  # anything PIL raises on a bad upload
            raise gr.Error(oner_demo.image_error_message(error), print_exception=False) from error

    component.preprocess = preprocess
    return component


def classification_tab() -> None:
    with gr.Row():
        with gr.Column():
            image = image_input("Image", elem_id="classify-image")
            labels = gr.Textbox(label="Labels (comma-separated)", value="cat face, dog face, red apple, rocket")
            template = gr.Textbox(label="Prompt template ({} = the label)", value="{}")
            button = gr.Button("Classify", variant="primary")
        with gr.Column():
            result = gr.Label(label="Probabilities", num_top_classes=10, elem_id="classify-result")
    gr.Examples(
        [
            [str(EX / "openmoji_cat_face.png"), "cat face, dog face, red apple, rocket", "{}"],
            [str(EX / "openmoji_rocket.png"), "rocket, automobile, bicycle, sun", "{}"],
            [str(EX / "gallery" / "1f34c.png"), "banana, grapes, pizza, hamburger", "a {}"],
        ],
        inputs=[image, labels, template],
    )
    button.click(user_errors(oner_demo.classify), [image, labels, template], result, api_name="classify")


def localization_tab() -> None:
    gr.Markdown(
        "Every image patch is projected by the same head as text, so the cosine between a phrase and "
        "each patch is a heatmap with no extra module. The red box marks the best patch; the overlay "
        "shows the centre square the model sees."
    )
    with gr.Row():
        with gr.Column():
            image = image_input("Image", elem_id="localize-image")
            phrase = gr.Textbox(label="Phrase", value="rocket", elem_id="localize-phrase")
            button = gr.Button("Localize", variant="primary")
        with gr.Column():
            heatmap = gr.Image(
                label="Text-to-patch similarity", type="pil", format="png", height=384, elem_id="localize-heatmap"
            )
            summary = gr.Textbox(label="Best patch", elem_id="localize-summary")
    gr.Examples(
        [
            [str(EX / "composite_cat_apple_rocket.png"), "rocket"],
            [str(EX / "composite_cat_apple_rocket.png"), "cat face"],
            [str(EX / "composite_dog_sun_banana.png"), "sun"],
        ],
        inputs=[image, phrase],
    )
    button.click(user_errors(functools.partial(localize_to_file, heatmap.GRADIO_CACHE)), [image, phrase],
                 [heatmap, summary], api_name="localize")


def localize_to_file(cache_dir: str, image, phrase: str) -> tuple[str, str]:
    """`oner_demo.localize`, its heatmap written to a file of its own in Gradio's cache.

    Handed a PIL image, Gradio writes it to a path named by the picture's hash, truncating and
    rewriting that file on every request (`gradio.processing_utils.save_pil_to_cache`): identical
    requests at once then rewrite a heatmap while it is being sent, and the response ends short of
    its declared Content-Length. A unique file, whole before it is returned, is served as it is.
    """
    picture, summary = oner_demo.localize(image, phrase)
    folder = Path(cache_dir) / "oner-heatmaps"
    folder.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(suffix=".png", dir=folder)
    with os.fdopen(fd, "wb") as file:
        picture.save(file, format="PNG")
    return path, summary


def gallery_output(label: str) -> gr.Gallery:
    return gr.Gallery(label=label, columns=oner_demo.TOP_K, height=200, object_fit="contain")


def retrieval_tab() -> None:
    gr.Markdown(f"Search a gallery of {len(oner_demo.read_gallery_file()[0])} Twemoji images and their names.")
    with gr.Row():
        with gr.Column():
            query = gr.Textbox(label="Text query", value="red apple")
            text_button = gr.Button("Find images", variant="primary")
            images = gallery_output("Top images")
            gr.Examples([["red apple"], ["rocket"], ["cat face"]], inputs=[query])
        with gr.Column():
            image = image_input("Image query")
            image_button = gr.Button("Find captions", variant="primary")
            captions = gr.Label(label="Top captions", num_top_classes=oner_demo.TOP_K)
            gr.Examples([[str(EX / "openmoji_red_apple.png")], [str(EX / "openmoji_rocket.png")]], inputs=[image])
    text_button.click(user_errors(oner_demo.search_images), query, images, api_name="search_images")
    image_button.click(user_errors(oner_demo.search_captions), image, captions, api_name="search_captions")


def multimodal_tab() -> None:
    gr.Markdown(
        "The image and the phrase are encoded together as ONE sequence `[CLS] + patches + words`; "
        "the same gallery is searched with the joint query, the image alone and the phrase alone."
    )
    with gr.Row():
        image = image_input("Image")
        with gr.Column():
            phrase = gr.Textbox(label="Phrase", value="red")
            button = gr.Button("Search", variant="primary")
    joint = gallery_output("Image + phrase (one sequence)")
    image_only = gallery_output("Image only")
    text_only = gallery_output("Phrase only")
    gr.Examples(
        [[str(EX / "openmoji_cat_face.png"), "dog"], [str(EX / "openmoji_red_apple.png"), "yellow fruit"]],
        inputs=[image, phrase],
    )
    button.click(
        user_errors(oner_demo.multimodal_search),
        [image, phrase],
        [joint, image_only, text_only],
        api_name="multimodal_search",
    )


def build_demo(model_name: str) -> gr.Blocks:
    """The Blocks app for the model already activated in `oner_demo` (named `model_name` on the page)."""
    # Result files (the heatmaps) are deleted an hour after they were made, checked every 10 minutes.
    with gr.Blocks(title="OneR demo", delete_cache=(600, 3600)) as demo:
        gr.Markdown(INTRO.format(model=model_name))
        with gr.Tab("Zero-shot classification"):
            classification_tab()
        with gr.Tab("Zero-shot localization"):
            localization_tab()
        with gr.Tab("Retrieval"):
            retrieval_tab()
        with gr.Tab("Multimodal query"):
            multimodal_tab()
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=QUEUE_SIZE)
    return demo


def create_demo(model: str | None = None, revision: str | None = None) -> gr.Blocks:
    """Load the model (`model`, else ONER_MODEL, ...) at `revision` (else ONER_MODEL_REVISION) and build the app.

    Activates the model for the `oner_demo` functions; does not launch anything.
    """
    model_name = oner_demo.resolve_model(model)
    revision = oner_demo.resolve_revision(revision)
    bundle = oner_demo.activate(oner_demo.load_model(model_name, revision=revision))
    return build_demo(f"{model_name}@{bundle.revision}" if bundle.revision else model_name)


def __getattr__(name: str):
    """`app.demo`, built on first access so that importing this module loads no model (PEP 562)."""
    if name == "demo":
        global demo
        demo = create_demo()
        return demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def launch(demo: gr.Blocks, host: str, port: int | None, **kwargs):
    """Start serving; extra kwargs (prevent_thread_lock, ...) go to `Blocks.launch`."""
    return demo.launch(
        server_name=host,
        server_port=port,
        max_file_size=MAX_FILE_SIZE,
        allowed_paths=[str(oner_demo.EXAMPLES_DIR)],
        **kwargs,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="OneR Gradio demo")
    parser.add_argument("--model", help="model folder or Hub id (default: $ONER_MODEL, then the embedded run's folder)")
    parser.add_argument("--revision", help="commit, branch or tag of a Hub model (default: $ONER_MODEL_REVISION)")
    parser.add_argument("--port", type=int, help="port (default: $GRADIO_SERVER_PORT, then 7860)")
    parser.add_argument("--host", help="address (default: $GRADIO_SERVER_NAME, then 127.0.0.1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    global demo  # module-level, where `gradio app.py` looks for it when it reloads the file
    args = parse_args(argv)
    demo = create_demo(args.model, args.revision)
    host = args.host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    port = args.port or int(os.environ.get("GRADIO_SERVER_PORT") or 7860)
    launch(demo, host, port)


if __name__ == "__main__":
    main()
