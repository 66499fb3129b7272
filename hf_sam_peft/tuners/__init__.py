"""Our peft tuner types, registered with peft on import (so `get_peft_model` and `PeftModel.from_pretrained` know them)."""

from .adaptformer import AdaptFormerConfig, AdaptFormerModel
from .attn_tune import AttnTuneConfig, AttnTuneModel
from .bias_tune import BiasTuneConfig, BiasTuneModel
from .fact import FactConfig, FactModel
from .freeze_encoder import FreezeEncoderConfig, FreezeEncoderModel
from .ln_tune import LNTuneConfig, LNTuneModel
from .lora import quantize_image_encoder, qv_lora_config, register_qv_lora
from .registration import add_peft_type, register_tuner
from .ssf import SSFConfig, SSFModel

# peft type name -> (config, tuner model); each model class carries its unique state-dict prefix
TUNERS = {
    "freeze_encoder": (FreezeEncoderConfig, FreezeEncoderModel),
    "ln_tune": (LNTuneConfig, LNTuneModel),
    "bias_tune": (BiasTuneConfig, BiasTuneModel),
    "attn_tune": (AttnTuneConfig, AttnTuneModel),
    "adaptformer": (AdaptFormerConfig, AdaptFormerModel),
    "ssf": (SSFConfig, SSFModel),
    "fact": (FactConfig, FactModel),
}

for _name, (_config_cls, _model_cls) in TUNERS.items():
    # the enum member must exist before a config's __post_init__ can name it
    add_peft_type(_name)
    register_tuner(_name, _config_cls, _model_cls, prefix=_model_cls.prefix)

__all__ = [
    "AdaptFormerConfig", "AttnTuneConfig", "BiasTuneConfig", "FactConfig", "FreezeEncoderConfig", "LNTuneConfig",
    "SSFConfig", "TUNERS", "qv_lora_config", "quantize_image_encoder", "register_qv_lora",
]
