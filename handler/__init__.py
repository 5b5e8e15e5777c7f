"""TorchServe handler for the paged engine."""
