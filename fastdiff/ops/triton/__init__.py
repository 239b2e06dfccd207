"""Triton kernels for fastdiff's ops, one module per op.

Each module imports even without Triton installed and says so through its
``AVAILABLE`` flag, so importing this package stays cheap and never fails.
"""
