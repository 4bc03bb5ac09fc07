"""Tiny helper to write clean notebooks from Python (used to author notebooks/NN_*.ipynb).

    from tools.nb import write_notebook, md, code, params
    write_notebook("notebooks/00_testbed.ipynb", [md("# Title"), params("MODE: str = 'full'  # ..."), code("...")])

Outputs and execution counts are never written; the parameters cell carries the papermill `parameters` tag.
"""
import json
import textwrap

from qvlm.paths import KERNELSPEC, LANGUAGE_INFO


def _src(text):
    text = textwrap.dedent(text).strip("\n")
    lines = text.split("\n")
    return [l + "\n" for l in lines[:-1]] + [lines[-1]]


def md(text):
    return {"cell_type": "markdown", "metadata": {}, "source": _src(text)}


def code(text, tags=()):
    meta = {"tags": list(tags)} if tags else {}
    return {"cell_type": "code", "execution_count": None, "metadata": meta, "outputs": [], "source": _src(text)}


def params(text):
    return code(text, tags=("parameters",))


def write_notebook(path, cells):
    nb = {"cells": cells, "metadata": {"kernelspec": KERNELSPEC, "language_info": LANGUAGE_INFO},
          "nbformat": 4, "nbformat_minor": 5}
    for i, c in enumerate(nb["cells"]):
        c["id"] = f"c{i:02d}"
    with open(path, "w") as f:
        json.dump(nb, f, indent=1)
        f.write("\n")
