"""Modules that minigun imports when it first uses them, not when it is imported: what
``import minigun`` costs every process that imports it (docs/performance.md, W5-import).

:class:`ImportedOnFirstUse` stands for a module that only some runs need. The standard
library's are here: ``asyncio`` (about a quarter of the package's import, with the ssl it
loads) for async stages, ``inspect`` (with ``ast``, ``dis`` and ``tokenize``) for callables
that are not plain functions, ``copy`` for a custom Stage that copies itself, ``weakref``
for the executors that keep state per run, ``math`` for a run's JSON. minigun's own
(``aio``, ``progress``, ``mermaid``) are made where they are used. Modules that use one
import the real module under ``TYPE_CHECKING``, so type checkers see it as it is.

A forked child inherits what its parent imported, and imports the rest itself, once per
child: the modules here are first used in the parent, but for ``copy``, which a spawn_fork
child may use to copy a custom Stage (``spawn_fork`` imports it for its own use, so its
children find it loaded).
"""

from __future__ import annotations

import importlib
from typing import Any


class ImportedOnFirstUse:
    """A module imported the first time one of its attributes is read."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


asyncio: Any = ImportedOnFirstUse("asyncio")
copy: Any = ImportedOnFirstUse("copy")
inspect: Any = ImportedOnFirstUse("inspect")
math: Any = ImportedOnFirstUse("math")
weakref: Any = ImportedOnFirstUse("weakref")
