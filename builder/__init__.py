"""builder: Llama-3.1-Nemotron-Ultra (nemotron-nas) from HF checkpoint to verified TensorRT-LLM
artifacts.

`import builder` is enough for transformers to load nemotron-nas checkpoints without remote
code (`AutoModelForCausalLM.from_pretrained(dir)`, `transformers.pipeline(...)`): the Auto
classes are registered when transformers is imported (builder/_autoregister.py).
"""

__version__ = "0.1.0"

from builder import _autoregister  # after __version__, which builder.model reads

_autoregister.install()
