"""Our Python-backend models, copied as `<model>/1/model.py` into generated repositories.

They run inside Triton's Python-backend stub, not in builder: each is standalone (numpy,
transformers, triton_python_backend_utils), except `executor.py`, the CPU stand-in for the
tensorrt_llm model that runs builder's checkpoint executor (tests and `builder demo`).
The stub's interpreter ignores PYTHONPATH, so each file first prepends the directories in
BUILDER_TRITON_PYTHONPATH (set by builder.triton.server) to sys.path.
"""
