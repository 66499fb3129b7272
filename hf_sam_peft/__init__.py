"""hf-sam-peft: parameter-efficient fine-tuning of Segment Anything with transformers + peft.

Importing this package registers its tuner types with peft, so `get_peft_model(sam, FactConfig())` and
`PeftModel.from_pretrained(sam, path)` work for them.
"""

__version__ = "0.1.0"

import importlib as _importlib
import logging as _logging

# bitsandbytes (imported by peft) warns on CPUs with AVX512-BF16 that it cannot fetch an optional kernel from
# the Hub; we never want that download, so the warning is noise for our users (unless they set the level).
_bnb_cpu_logger = _logging.getLogger("bitsandbytes.backends.cpu.ops")
if _bnb_cpu_logger.level == _logging.NOTSET:
    _bnb_cpu_logger.setLevel(_logging.ERROR)

# after the logger setting on purpose: these imports load peft, which loads bitsandbytes when it is installed
from .loading import load_adapter
from .methods import (
    METHOD_NAMES,
    METHODS,
    apply_method,
    count_parameters,
    method_config,
)
from .tuners import (
    AdaptFormerConfig,
    AttnTuneConfig,
    BiasTuneConfig,
    FactConfig,
    FreezeEncoderConfig,
    LNTuneConfig,
    SSFConfig,
    quantize_image_encoder,
    qv_lora_config,
)

# Hub helpers import huggingface_hub and the modeling stack; load them on first use so `import hf_sam_peft`
# stays light.
_LAZY = {
    "from_pretrained": "hub", "save_adapter": "hub", "push_adapter_to_hub": "hub",
    "load_base_model": "modeling", "LiteSamModel": "modeling",
}


# PEP 562 module __getattr__: called only for names not found in the module, i.e. the _LAZY ones
def __getattr__(name: str):
    if name in _LAZY:
        return getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hf_sam_peft' has no attribute {name!r}")


__all__ = [
    "AdaptFormerConfig", "AttnTuneConfig", "BiasTuneConfig", "FactConfig", "FreezeEncoderConfig", "LNTuneConfig",
    "METHODS", "METHOD_NAMES", "SSFConfig", "apply_method", "count_parameters", "load_adapter", "method_config", "qv_lora_config",
    "quantize_image_encoder", "from_pretrained", "save_adapter", "push_adapter_to_hub",
    "load_base_model", "LiteSamModel",
]
