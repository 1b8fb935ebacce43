"""Snapshot ensembles: each snapshot's logits computed once, every ensemble is arithmetic on them.

The rules that combine members live in `rules` (the product's default averages logits; averaging softmax
probabilities, Huang et al. 2017, arXiv 1704.00109, section 4, and majority vote are options), which members and
with which weights in `members`, the one object for "some members, a rule, weights, a temperature" is `Ensemble`,
and the report of a run is `report`. Nothing here chooses members by looking at test accuracy.
"""

import importlib

# Imported on first use (PEP 562), so that `python -m snapens.ensemble --help` needs no torch; the names this package
# has always offered stay where they were.
_HOMES = {"RULES": "rules", "check_rule": "rules", "combine": "rules", "votes": "rules", "predict_logits": "cache"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'snapens.ensemble' has no attribute {name!r}")
    return getattr(importlib.import_module(f"snapens.ensemble.{_HOMES[name]}"), name)
