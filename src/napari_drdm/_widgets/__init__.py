"""napari widgets (Qt through qtpy only). Heavy imports (torch, the model) happen inside functions."""
