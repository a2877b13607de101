"""The store: engine, tables, migrations, the batch writer and rollups."""
