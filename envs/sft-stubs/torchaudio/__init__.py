"""Stand-in for ``torchaudio`` in the SFT environment on CPU machines (installed by ``make setup-sft``).

LLaMA-Factory 0.9.5 imports ``torchaudio`` at module level (``llamafactory/data/mm_plugin.py``)
although only its audio datasets use it. PyPI's torchaudio wheels are built against CUDA torch
and fail to load next to the CPU ``torch==2.13.0``, so ``make setup-sft`` removes them and puts
this module in their place when the real one cannot be imported. Text-only SFT never touches it;
any use of an attribute raises an ImportError that says why.
"""

__version__ = "0.0.0+sap.stub"


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError(
        f"torchaudio.{name}: this is sap's stand-in torchaudio (the PyPI wheels do not load with CPU torch); "
        "audio datasets need a torchaudio build that matches the installed torch"
    )
