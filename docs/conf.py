"""Sphinx configuration of the repkern documentation.

Build (what scripts/test.sh runs, warnings are errors):

    python -m sphinx -E -W --keep-going -b html docs build/docs

The API reference is generated from the docstrings of the installed package (autodoc + napoleon), so
repkern must be importable: build it first (``pip install .`` or ``bash scripts/test.sh``). Markdown pages
are read by myst-parser. ``-E`` rereads every page: Sphinx does not notice a changed docstring.
"""

from __future__ import annotations

import repkern

project = "repkern"
author = "the repkern authors"
copyright = "the repkern authors, Apache-2.0"  # noqa: A001 (Sphinx's name)
version = release = repkern.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Markdown: anchors for headings up to ### so that pages can link to sections (design.md#the-emulator).
myst_heading_anchors = 3

# The docstrings are written in Google style (Args:, Returns:); shapes and dtypes live in the text.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
# Signatures print default values as written in the source (1 << 30, not 1073741824).
autodoc_preserve_defaults = True

# Cross-references to torch, numpy and the standard library are left unresolved (no intersphinx: the
# build runs offline), so nitpicky mode stays off.
nitpicky = False

html_theme = "alabaster"
html_title = f"repkern {release}"
html_static_path: list[str] = []
