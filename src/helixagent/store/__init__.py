"""Completion records: database, migrations, encryption."""
