"""Fold rules, one per file: each is pattern -> check (reason when it fails) -> rewrite. protocol.py says
what a rule is, skeleton.py holds the steps the layer folds share, base.py their checks and math."""
