"""Static files of the web playground (served at /playground by server/api/playground.py)."""
