"""Interoperability tests between qctl and the released Celery 5.7 (a test-only peer that
runs from its own virtual environment, see ``conftest.py``)."""
