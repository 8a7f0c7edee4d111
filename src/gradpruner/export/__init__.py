"""Export: a model folder written for another runtime. ``FORMATS`` maps each ``--format`` to its writer;
GGUF for llama.cpp is the one format so far (``export.gguf_file``)."""
from gradpruner.export.gguf_file import TYPES, export_gguf

FORMATS = {"gguf": export_gguf}

__all__ = ["FORMATS", "TYPES", "export_gguf"]
