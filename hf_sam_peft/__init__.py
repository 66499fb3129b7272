"""hf-sam-peft: parameter-efficient fine-tuning of Segment Anything with transformers + peft."""

__version__ = "0.1.0"
