"""Storage tiers: cold snapshots (`snapshots`), the moves between tiers (`moves`), and the
rules that decide them (`rules`). Plain functions over a pool and an object store; the Dagster
jobs and the sensor in `defs/tiers/` call them, holding the collection's writer lock."""
