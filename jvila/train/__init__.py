"""Training: the jitted train step over the functional core (`step`), its loss (`forward`), the optimizer
and stage masks (`optimizer`), and the loop, recipes and checkpoints built on them."""
