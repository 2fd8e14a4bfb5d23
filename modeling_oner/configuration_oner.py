"""OneR configuration.

This file is shipped as transformers remote code next to `modeling_oner.py`: it imports only
`transformers` (see "Remote code" in `docs/method.md`).
"""

from transformers import PretrainedConfig

# Named sizes. `tiny` is the embedded default, chosen by time-to-quality on 2 CPU cores (10 minutes,
# docs/benchmarks.md: at that budget the steps a model reaches matter more than its depth); `small`
# is the earlier default, for machines that have more; `base-patch16-224` is the paper's scale
# (ViT-B/16 on 224 px images, BERT WordPiece text of at most 78 tokens).
ONER_PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        image_size=32,
        patch_size=4,
        max_position_embeddings=32,
        projection_dim=128,
        pooling="mean",
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        image_size=64,
        patch_size=8,
        max_position_embeddings=32,
        projection_dim=256,
        pooling="mean",
    ),
    "base-patch16-224": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=224,
        patch_size=16,
        max_position_embeddings=78,
        projection_dim=512,
        pooling="mean",
    ),
}

PROJECTION_HEADS = ("linear", "mlp")
POOLINGS = ("cls", "mean", "cls+mean")


class OneRConfig(PretrainedConfig):
    r"""Configuration of a [`OneRModel`]: one transformer and one projection head for every modality.

    Args:
        hidden_size (`int`): width of the shared transformer.
        num_hidden_layers (`int`): number of shared transformer layers.
        num_attention_heads (`int`): attention heads per layer; must divide `hidden_size`.
        intermediate_size (`int`): width of each layer's MLP.
        hidden_act (`str`): MLP activation (a key of `transformers.activations.ACT2FN`).
        layer_norm_eps (`float`): epsilon of every LayerNorm.
        attention_dropout (`float`): dropout on attention probabilities.
        image_size (`int`): side of the square input image, in pixels.
        patch_size (`int`): side of one image patch; must divide `image_size`.
        num_channels (`int`): image channels (3 for RGB).
        vocab_size (`int`): size of the WordPiece vocabulary.
        max_position_embeddings (`int`): longest text, in tokens (the shared [CLS] is extra).
        projection_dim (`int`): size of the shared embedding space.
        projection_head (`str`): `"linear"` (CLIP-style, the default) or `"mlp"` (Linear-GELU-Linear,
            MoCo v3-style). The paper says one shared head but not its shape [inferred].
        pooling (`str`): how a sequence becomes one vector before the shared head [inferred; the paper
            does not say]. `"cls"`: the shared [CLS] token's output. `"mean"`: the mean of the patch
            outputs, of the word outputs (padding excluded), or for a joint sequence the average of
            the two modalities' means ([CLS] excluded), so that, with the linear head, a global score
            is the mean of the token scores and every contrastive step also shapes the patch-level
            map used for localization. `"cls+mean"`: the average of the two.
        use_modality_embeddings (`bool`): add a learned image/text type embedding to every token.
            The paper's modality-agnostic aim suggests keeping such pieces minimal; unknown whether
            OneR has one [inferred], so it is a switch (default on, which joint sequences need most).
        logit_scale_init_value (`float`): initial log of the inverse temperature (ln(1/0.07) = 2.6592).
        logit_bias_init (`float`, *optional*): when set, the model has a learned logit bias added to every
            score, initialised at this value, as SigLIP does; a model trained with the pairwise sigmoid
            loss has one (-10), so its `logits_per_image` are the ones it was trained to output.
        initializer_range (`float`): std of the truncated-normal weight initialisation.
        pad_token_id (`int`): id of the padding token.
        mask_token_id (`int`): id of the [MASK] token (masked-language modelling).
    """

    model_type = "oner"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        vocab_size: int = 30522,
        max_position_embeddings: int = 78,
        projection_dim: int = 512,
        projection_head: str = "linear",
        pooling: str = "cls",
        use_modality_embeddings: bool = True,
        logit_scale_init_value: float = 2.6592,
        logit_bias_init: float | None = None,
        initializer_range: float = 0.02,
        pad_token_id: int = 0,
        mask_token_id: int = 103,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.projection_dim = projection_dim
        self.projection_head = projection_head
        self.pooling = pooling
        self.use_modality_embeddings = use_modality_embeddings
        self.logit_scale_init_value = logit_scale_init_value
        self.logit_bias_init = logit_bias_init
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        # The zero-shot-image-classification pipeline loads AutoModelForZeroShotImageClassification;
        # register_for_auto_class only writes AutoConfig/AutoModel, so the rest is declared here.
        kwargs.setdefault(
            "auto_map",
            {
                "AutoConfig": "configuration_oner.OneRConfig",
                "AutoModel": "modeling_oner.OneRModel",
                "AutoModelForZeroShotImageClassification": "modeling_oner.OneRModel",
            },
        )
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.validate_oner()

    def validate_oner(self) -> None:
        """Raise ValueError naming the field for an inconsistent config. Runs here and again in
        `OneRModel.__init__`, since `from_pretrained(dir, hidden_size=...)` sets its keyword
        overrides after `__init__`."""
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                     "patch_size", "num_channels", "vocab_size", "max_position_embeddings", "projection_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        hidden_size, num_attention_heads = self.hidden_size, self.num_attention_heads
        image_size, patch_size = self.image_size, self.patch_size
        projection_head, pooling = self.projection_head, self.pooling
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"
            )
        if image_size % patch_size != 0:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
        if projection_head not in PROJECTION_HEADS:
            raise ValueError(f"projection_head must be one of {PROJECTION_HEADS}, got {projection_head!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "OneRConfig":
        """A config from a named preset (`ONER_PRESETS`), with any field overridden."""
        if name not in ONER_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(ONER_PRESETS)}")
        return cls(**{**ONER_PRESETS[name], **overrides})
