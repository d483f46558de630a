"""What composes both actors: the in-process world, the invariant checker, experiments, conformance."""
