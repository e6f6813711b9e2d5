"""The dashboard served under ``/ui`` (see ``app.py``)."""
