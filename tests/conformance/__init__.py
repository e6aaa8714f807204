"""The conformance matrix of ``tests/test_conformance.py``: every strategy (``strategies``)
x every stage form, in the class DSL and the builder API (``forms``), under the same
expectations. A new strategy joins by adding one entry to ``strategies.REGISTRY``."""
