"""The models: one folder per family (``ant``, ``bee``, ``cpm1``), the shared checkpoint code,
the CPU runtime (``runtime``) and the registry that lists the families."""
