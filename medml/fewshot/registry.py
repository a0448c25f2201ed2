"""The decision-rule registry: each rule's name and the dotted path of its class.

Names only, so that the settings can check ``prototypes.rule`` without importing numpy and
the rules (:mod:`medml.fewshot.rules`, where each class's ``name`` is its key here). To add a
rule: write its class in ``rules.py`` and register it below with one line.
"""

from __future__ import annotations

from medml.extensions import Registry

RULES: Registry[str] = Registry("decision rule")
RULES.register("centroid", "medml.fewshot.rules.Centroid")
RULES.register("centroid-prior", "medml.fewshot.rules.CentroidPrior")
RULES.register("kmeans", "medml.fewshot.rules.KMeansPrototypes")
RULES.register("knn", "medml.fewshot.rules.KNNVote")
RULES.register("linear", "medml.fewshot.rules.LinearProbe")
