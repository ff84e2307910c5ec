"""s4bt_hf: S4 models built from Diagonal State Space layers, as native transformers models, and
their compression by balanced truncation.

Importing the package registers the model with `AutoConfig`, `AutoModel`,
`AutoModelForSequenceClassification` and `AutoModelForAudioClassification`, and its feature
extractor with `AutoFeatureExtractor`.
"""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForSequenceClassification,
)

from .compression_report import CompressionReport, LayerCompression
from .configuration_s4dss import S4DSSConfig
from .feature_extraction_s4dss import S4DSSFeatureExtractor
from .hub_s4dss import IncompleteCheckpointWarning
from .modeling_s4dss import (
    S4DSSForSequenceClassification,
    S4DSSModel,
    S4DSSPreTrainedModel,
    S4DSSStreamingState,
)

__version__ = "0.1.0"

AutoConfig.register(S4DSSConfig.model_type, S4DSSConfig, exist_ok=True)
AutoModel.register(S4DSSConfig, S4DSSModel, exist_ok=True)
AutoModelForSequenceClassification.register(S4DSSConfig, S4DSSForSequenceClassification, exist_ok=True)
# a one-channel signal classifier is what pipeline("audio-classification") runs
AutoModelForAudioClassification.register(S4DSSConfig, S4DSSForSequenceClassification, exist_ok=True)
AutoFeatureExtractor.register(S4DSSConfig, S4DSSFeatureExtractor, exist_ok=True)
# Saved checkpoints also carry the code, for users without this package (trust_remote_code=True).
S4DSSConfig.register_for_auto_class()
S4DSSModel.register_for_auto_class("AutoModel")
S4DSSForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
S4DSSFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")


def __getattr__(name):
    # Training helpers live in `s4bt_hf.training`; importing them lazily keeps `import s4bt_hf`
    # free of accelerate (the top level is the model a checkpoint carries).
    if name == "hankel_penalty":
        from .training.hankel_penalty import hankel_penalty

        return hankel_penalty
    if name == "ssm_param_groups":
        from .training.optimization import ssm_param_groups

        return ssm_param_groups
    raise AttributeError(f"module 's4bt_hf' has no attribute {name!r}")


__all__ = [
    "CompressionReport",
    "IncompleteCheckpointWarning",
    "LayerCompression",
    "S4DSSConfig",
    "S4DSSFeatureExtractor",
    "S4DSSForSequenceClassification",
    "S4DSSModel",
    "S4DSSPreTrainedModel",
    "S4DSSStreamingState",
    "hankel_penalty",
    "ssm_param_groups",
]
