"""Fold rules, one per file: each is pattern -> check (reason when it fails) -> rewrite."""
