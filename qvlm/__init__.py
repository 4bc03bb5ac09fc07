"""qvlm: a faithful, tested implementation of Q-VLM (Wang et al., NeurIPS 2024) post-training quantization
for LLaVA-architecture vision-language models. Read the notebooks in order; logic lives here."""
import os as _os

_os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing is ever downloaded at run time

from . import config, errors, paths, utils  # noqa: E402,F401

__version__ = "0.1.0"
