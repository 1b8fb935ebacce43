"""Snapshot ensembles: each snapshot's logits computed once, every ensemble is arithmetic on them.

The rules that combine members live in `rules` (the product's default averages logits; averaging softmax
probabilities, Huang et al. 2017, arXiv 1704.00109, section 4, and majority vote are options), which members and
with which weights in `members`, the one object for "some members, a rule, weights, a temperature" is `Ensemble`,
and the report of a run is `report`. Nothing here chooses members by looking at test accuracy.
"""
