"""The fold pass: a graph view over the model, fold rules (one per file), the pass that applies
them, and its report."""
