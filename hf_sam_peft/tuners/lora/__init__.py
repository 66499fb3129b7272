"""LoRA and QLoRA use peft's own LoRA; these are the SAM pieces: q/v-only layers for the fused qkv and 4-bit."""

from .config import is_qv_lora_state, qv_lora_config, register_qv_lora
from .layer import QVLoraLinear
from .quantization import quantize_image_encoder

__all__ = ["QVLoraLinear", "is_qv_lora_state", "qv_lora_config", "quantize_image_encoder", "register_qv_lora"]
