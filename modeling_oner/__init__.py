"""OneR model and config, registered with transformers' Auto classes.

`register_for_auto_class` makes `save_pretrained` copy `configuration_oner.py` and `modeling_oner.py`
flat into the saved folder with an `auto_map`, so the folder loads with `trust_remote_code=True`
where this package is not installed. `AutoConfig.register`/`AutoModel.register` make the in-process
Auto classes know "oner" too.
"""

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

from .configuration_oner import ONER_PRESETS, OneRConfig
from .modeling_oner import OneRModel, OneROutput, OneRPreTrainedModel

OneRConfig.register_for_auto_class()
OneRModel.register_for_auto_class("AutoModel")

AutoConfig.register("oner", OneRConfig, exist_ok=True)
AutoModel.register(OneRConfig, OneRModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(OneRConfig, OneRModel, exist_ok=True)

__all__ = ["ONER_PRESETS", "OneRConfig", "OneRModel", "OneROutput", "OneRPreTrainedModel"]
