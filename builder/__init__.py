"""builder: Llama-3.1-Nemotron-Ultra (nemotron-nas) from HF checkpoint to verified TensorRT-LLM artifacts."""

__version__ = "0.1.0"
