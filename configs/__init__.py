"""batchlab's configurations, installed with the package as ``batchlab.configs`` (pyproject.toml maps this folder
there): what ``batchlab fit`` and ``batchlab study`` run without ``-c``, and the overlays to stack on them.
``batchlab.arguments`` reads them with ``importlib.resources``; a regular package, not a namespace, so that an
editable install finds it too."""
