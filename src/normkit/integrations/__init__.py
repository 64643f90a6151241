"""Optional glue to other libraries. Each module imports its library only when used; nothing in normkit's
core imports this package.

- :mod:`normkit.integrations.timm` — ``register()`` adds normkit's optimizers to timm's optimizer factory
  (``pip install 'normkit[timm]'``).
- :mod:`normkit.integrations.lightning` — PyTorch Lightning callbacks ``LSUVInit`` and ``ENormCallback`` and
  the ``SyncBatchRenormPlugin`` layer-sync plugin (``pip install 'normkit[lightning]'``).
"""
