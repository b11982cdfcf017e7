"""Static files of the web playground (served at /playground by server/compare.py)."""
