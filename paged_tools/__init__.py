"""Test and benchmark tooling (a private TorchServe, gRPC stubs, frontend job counts).

Not shipped: setup.cfg packages only paged, kernels and handler. Import it from the repository
root (pytest and the bench scripts run there).
"""
