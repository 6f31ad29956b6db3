"""Not code: see configs/__init__.py (gin include lookup of ``configs/methods/*.gin``)."""
